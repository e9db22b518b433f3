"""Tokens and logprobs of the tiny-gqa fixture, recorded before the code was restructured
(tests/fixtures/golden.json): every decode path must still give them."""

import json

import pytest
import torch

from tests.conftest import FIXTURES, TOKENIZER

GOLDEN = json.loads((FIXTURES / "golden.json").read_text())
DIALOGS = [[{"role": "system", "content": "Be brief"}, {"role": "user", "content": "你好"}], [{"role": "user", "content": "hi"}]]


@pytest.mark.parametrize("fixture", ["tiny-gqa", "tiny-gqa-mp2"])
@pytest.mark.parametrize("fast", [False, True], ids=["faithful", "fast"])
def test_golden_tokens_and_logprobs(fixture, fast):
    from llama import Llama

    llama = Llama.build(str(FIXTURES / fixture), TOKENIZER, max_seq_len=GOLDEN["max_seq_len"], max_batch_size=4,
                        device="cpu", dtype="float32", fast=fast)
    text = llama.text_completion(GOLDEN["prompts"], temperature=0, max_gen_len=24, logprobs=True, echo=True)
    chat = llama.chat_completion(DIALOGS, temperature=0, max_gen_len=16, logprobs=True)
    for got, want in zip(text + chat, GOLDEN["text"] + GOLDEN["chat"]):
        assert got["tokens"] == want["tokens"] and got["generation"] == want["generation"]
        assert len(got["logprobs"]) == len(want["logprobs"])
        torch.testing.assert_close(got["logprobs"], want["logprobs"], rtol=0, atol=1e-4)  # float32 rounding
    assert len(text) == len(GOLDEN["text"]) and len(chat) == len(GOLDEN["chat"])
