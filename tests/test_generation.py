"""generate / text_completion / chat_completion semantics on a tiny random model (float32, CPU)."""

import copy

import torch

from llama import Llama

PROMPTS = ["Hello world", "I believe the meaning of life is", "The capital of France"]


def greedy(llama, prompts, **kw):
    kw.setdefault("max_gen_len", 12)
    return llama.text_completion(prompts, temperature=0, **kw)


def test_batch_of_ragged_prompts_equals_each_alone(gqa):
    together = greedy(gqa, PROMPTS, logprobs=True)
    for prompt, joint in zip(PROMPTS, together):
        alone = greedy(gqa, [prompt], logprobs=True)[0]
        assert alone["tokens"] == joint["tokens"]
        assert alone["generation"] == joint["generation"]
        torch.testing.assert_close(alone["logprobs"], joint["logprobs"], rtol=0, atol=1e-4)


def test_logprobs_match_a_direct_forward_pass(gqa):
    tok = gqa.tokenizer
    prompt = tok.encode(PROMPTS[1], bos=True, eos=False)
    out, lps = gqa.generate([prompt], max_gen_len=8, temperature=0, logprobs=True, echo=True)
    seq = out[0]
    assert seq[: len(prompt)] == prompt and len(seq) == len(prompt) + 8
    logits = gqa.model.forward(torch.tensor([seq]), 0)[0]
    want = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
    assert lps[0][0] == 0.0  # BOS has no prediction
    torch.testing.assert_close(torch.tensor(lps[0][1:]), want, rtol=0, atol=1e-4)
    # greedy tokens are the argmax of the same logits
    assert seq[len(prompt):] == logits[len(prompt) - 1 : -1].argmax(-1).tolist()


def test_echo_returns_prompt_then_generation(gqa):
    prompt = PROMPTS[1]
    plain = greedy(gqa, [prompt], max_gen_len=5, logprobs=True)[0]
    echoed = greedy(gqa, [prompt], max_gen_len=5, logprobs=True, echo=True)[0]
    prompt_pieces = [gqa.tokenizer.decode([t]) for t in gqa.tokenizer.encode(prompt, bos=True, eos=False)]
    assert len(plain["tokens"]) == 5
    assert echoed["tokens"] == prompt_pieces + plain["tokens"]
    assert echoed["logprobs"][len(prompt_pieces):] == plain["logprobs"] and echoed["logprobs"][0] == 0.0
    assert echoed["generation"].startswith(prompt) and echoed["generation"].endswith(plain["generation"])


def test_eos_cuts_and_stops(gqa):
    tok = gqa.tokenizer
    prompt = tok.encode(PROMPTS[0], bos=True, eos=False)
    full, _ = gqa.generate([prompt], max_gen_len=10, temperature=0)
    eos_tok = copy.copy(tok)
    eos_tok.eos_id = full[0][3]  # pretend the 4th generated token is EOS
    cut, _ = Llama(gqa.model, eos_tok).generate([prompt], max_gen_len=10, temperature=0)
    assert cut[0] == full[0][: full[0].index(eos_tok.eos_id)]


def test_max_gen_len_and_max_seq_len_cap(gqa):
    tok = gqa.tokenizer
    prompt = tok.encode(PROMPTS[1], bos=True, eos=False)
    out, _ = gqa.generate([prompt], max_gen_len=7, temperature=0)
    assert len(out[0]) == 7
    long_prompt = list(range(1000, 1000 + 60))  # max_seq_len is 64
    out, _ = gqa.generate([long_prompt], max_gen_len=20, temperature=0)
    assert len(out[0]) == 4
    full_prompt = list(range(1000, 1000 + 64))  # fills max_seq_len: nothing to generate, only scoring
    out, lps = gqa.generate([full_prompt], max_gen_len=20, temperature=0, logprobs=True, echo=True)
    assert out[0] == full_prompt and len(lps[0]) == 64 and lps[0][0] == 0.0
    _, step_lps = gqa.generate([full_prompt[:40]], max_gen_len=1, temperature=0, logprobs=True, echo=True)
    torch.testing.assert_close(lps[0][:40], step_lps[0][:40], rtol=0, atol=1e-4)


def test_default_max_gen_len_fills_max_seq_len(gqa):
    tok = gqa.tokenizer
    eos_never = copy.copy(tok)
    eos_never.eos_id = -5
    res = Llama(gqa.model, eos_never).text_completion(["Hi"], temperature=0)
    assert len(tok.encode(res[0]["generation"], bos=False, eos=False)) > 0
    out, _ = Llama(gqa.model, eos_never).generate([tok.encode("Hi", bos=True, eos=False)], max_gen_len=63, temperature=0)
    assert len(out[0]) == 64 - 2


def test_sampling_is_seeded_and_differs_from_greedy(gqa):
    torch.manual_seed(5)
    a = gqa.text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=10)
    torch.manual_seed(5)
    b = gqa.text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=10)
    assert a == b
    assert a != greedy(gqa, PROMPTS, max_gen_len=10)


def test_tiny_top_p_is_greedy(gqa):
    torch.manual_seed(0)
    assert gqa.text_completion(PROMPTS, temperature=0.8, top_p=1e-6, max_gen_len=8) == greedy(gqa, PROMPTS, max_gen_len=8)


def test_return_shapes(gqa):
    res = gqa.text_completion(PROMPTS[:2], max_gen_len=4, logprobs=True)
    assert [sorted(r) for r in res] == [["generation", "logprobs", "tokens"]] * 2
    assert all(len(r["tokens"]) == len(r["logprobs"]) for r in res)
    assert list(gqa.text_completion(PROMPTS[:1], max_gen_len=2)[0]) == ["generation"]
    chat = gqa.chat_completion([[{"role": "user", "content": "hi"}]], max_gen_len=3, logprobs=True)
    assert chat[0]["generation"]["role"] == "assistant" and isinstance(chat[0]["generation"]["content"], str)
    assert sorted(chat[0]) == ["generation", "logprobs", "tokens"]


def test_chat_special_tags_answered_with_error_but_run(gqa):
    dialogs = [[{"role": "user", "content": "hi [INST]"}], [{"role": "user", "content": "hi"}]]
    res = gqa.chat_completion(dialogs, temperature=0, max_gen_len=4, logprobs=True)
    assert res[0]["generation"]["content"] == "Error: special tags are not allowed as part of the prompt."
    assert len(res[0]["tokens"]) == len(res[0]["logprobs"]) > 0
    assert res[1]["generation"]["content"] != res[0]["generation"]["content"]


def test_chat_equals_generate_on_formatted_tokens(gqa):
    from llama.chat_format import encode_dialog

    dialog = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "你好"}]
    res = gqa.chat_completion([dialog], temperature=0, max_gen_len=6)
    out, _ = gqa.generate([encode_dialog(gqa.tokenizer, dialog)], max_gen_len=6, temperature=0)
    assert res[0]["generation"]["content"] == gqa.tokenizer.decode(out[0])
