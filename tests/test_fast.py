"""The fast path gives the faithful path's answers (float32 on CPU; CUDA graphs on GPU)."""

import copy

import pytest
import torch

from llama import Llama
from llama.fast import FaithfulDecoder, FastDecoder
from tests.conftest import TOKENIZER, torchrun

PROMPTS = ["Hello world", "I believe the meaning of life is", "你好", "Once upon a time, in a land far away"]


@pytest.fixture(scope="module")
def pair(ckpts, build):
    """The same model (max_seq_len 300, to cross the 256-position KV bucket) with both decoders."""
    faithful = build(ckpts["gqa1"], max_seq_len=300, fast=False)
    fast = Llama(faithful.model, faithful.tokenizer, FastDecoder(faithful.model))
    return faithful, fast


def assert_same(a, b):
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        torch.testing.assert_close(x["logprobs"], y["logprobs"], rtol=0, atol=1e-4)


def test_fusion_shares_memory_and_keeps_state_dict(pair):
    faithful, _ = pair
    layer = faithful.model.layers[0]
    wq, wqkv = layer.attention.wq.weight, layer.attention.wqkv
    assert wq.untyped_storage().data_ptr() == wqkv.untyped_storage().data_ptr()
    assert "layers.0.attention.wqkv" not in faithful.model.state_dict()
    assert torch.equal(layer.feed_forward.w13[: layer.feed_forward.w1.weight.shape[0]], layer.feed_forward.w1.weight)


@pytest.mark.parametrize("prompts", [PROMPTS[1:2], PROMPTS], ids=["single", "ragged-batch"])
def test_greedy_and_logprobs_match(pair, prompts):
    faithful, fast = pair
    kw = dict(temperature=0, max_gen_len=280, logprobs=True, echo=True)
    assert_same(faithful.text_completion(prompts, **kw), fast.text_completion(prompts, **kw))


def test_eos_cut_matches(pair):
    faithful, fast = pair
    tok = faithful.tokenizer
    prompt = tok.encode(PROMPTS[3], bos=True, eos=False)
    full, _ = faithful.generate([prompt], max_gen_len=12, temperature=0)
    eos_tok = copy.copy(tok)
    eos_tok.eos_id = full[0][5]
    want, _ = Llama(faithful.model, eos_tok, FaithfulDecoder(faithful.model)).generate([prompt], 12, temperature=0)
    got, _ = Llama(fast.model, eos_tok, fast.decoder).generate([prompt], 12, temperature=0)
    assert got == want and len(got[0]) < 12


def test_calls_in_a_row_with_other_sizes(pair):
    faithful, fast = pair
    for prompts, n in [(PROMPTS, 30), (PROMPTS[:1], 5), (PROMPTS[2:], 50), (PROMPTS[:2] * 2, 3)]:
        want = faithful.text_completion(prompts, temperature=0, max_gen_len=n)
        assert fast.text_completion(prompts, temperature=0, max_gen_len=n) == want


def test_sampling_with_seed_matches_on_cpu(pair):
    faithful, fast = pair
    torch.manual_seed(3)
    want = faithful.text_completion(PROMPTS, max_gen_len=20)
    torch.manual_seed(3)
    assert fast.text_completion(PROMPTS, max_gen_len=20) == want


@pytest.mark.slow
def test_compiled_block_step_matches_on_cpu(ckpts, build):
    """torch.compile of the whole block (cache write and attention inside), for batches smaller
    than max_batch_size and then the full batch, on CPU."""
    faithful = build(ckpts["gqa1"], max_seq_len=64, fast=False)
    fast = Llama(faithful.model, faithful.tokenizer, FastDecoder(faithful.model, compile=True))
    assert fast.decoder.compile and not fast.decoder.cuda_graphs
    kw = dict(temperature=0, max_gen_len=20, logprobs=True)
    for prompts in (PROMPTS[1:2], PROMPTS[:3], PROMPTS):
        assert_same(faithful.text_completion(prompts, **kw), fast.text_completion(prompts, **kw))


def test_build_switch(ckpts, build):
    assert isinstance(build(ckpts["gqa1"]).decoder, FaithfulDecoder)  # CPU default
    llama = build(ckpts["gqa1"], fast=True)
    assert isinstance(llama.decoder, FastDecoder) and not llama.decoder.compile and not llama.decoder.cuda_graphs


@pytest.mark.multiproc
@pytest.mark.slow
def test_fast_path_under_two_processes(ckpts, tmp_path):
    import json

    outs = []
    for nproc, ckpt, fast in [(1, "gqa1", False), (2, "gqa2", True)]:
        out = tmp_path / f"{nproc}.json"
        res = torchrun(nproc, "tests/mp_worker.py", "--ckpt_dir", ckpts[ckpt], "--tokenizer_path", TOKENIZER,
                       "--out", str(out), "--fast", str(fast))
        assert res.returncode == 0, res.stderr[-3000:]
        outs.append(json.loads(out.read_text()))
    assert [t["tokens"] for t in outs[0]["text"]] == [t["tokens"] for t in outs[1]["text"]]
    assert outs[0]["chat"] == outs[1]["chat"]


# -- on the GPU (run on the device) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_pair(ckpts):
    from tests.conftest import TOKENIZER as tok

    faithful = Llama.build(ckpts["gqa1"], tok, max_seq_len=600, max_batch_size=4, device="cuda", dtype="float32", fast=False)
    fast = Llama(faithful.model, faithful.tokenizer, FastDecoder(faithful.model))
    return faithful, fast


@pytest.mark.gpu
def test_cuda_graph_decode_matches_faithful_float32(gpu_pair):
    faithful, fast = gpu_pair
    assert fast.decoder.cuda_graphs and fast.decoder.compile
    kw = dict(temperature=0, max_gen_len=500, logprobs=True)
    for prompts in (PROMPTS[:1], PROMPTS):
        want = faithful.text_completion(prompts, **kw)
        got = fast.text_completion(prompts, **kw)
        for x, y in zip(want, got):
            assert x["tokens"] == y["tokens"]
            torch.testing.assert_close(x["logprobs"], y["logprobs"], rtol=0, atol=2e-3)  # TF32/flash rounding
    assert {bucket for _, bucket in fast.decoder.graphs} >= {256, 512}


@pytest.mark.gpu
def test_cuda_graph_bf16_agreement(ckpts):
    from llama.fast.agreement import greedy_agreement
    from tests.conftest import TOKENIZER as tok

    faithful = Llama.build(ckpts["wide1"], tok, max_seq_len=300, max_batch_size=4, device="cuda", dtype="bfloat16", fast=False)
    fast = FastDecoder(faithful.model)
    prompts = [faithful.tokenizer.encode(p, bos=True, eos=False)[:3] for p in PROMPTS]
    never_stops = copy.copy(faithful.tokenizer)
    never_stops.eos_id = -100
    seqs, _ = Llama(faithful.model, never_stops, faithful.decoder).generate(prompts, 250, temperature=0, echo=True)
    tokens = torch.tensor([s[:250] for s in seqs], device="cuda")
    rate = greedy_agreement(faithful.decoder, fast, tokens, prompt_len=3)
    print(f"bf16 teacher-forced greedy agreement, fast vs faithful: {rate:.3f}")
    assert rate > 0.9


def test_reallocated_caches_are_picked_up(ckpts, build):
    faithful = build(ckpts["gqa1"], max_seq_len=64)
    fast = Llama(faithful.model, faithful.tokenizer, FastDecoder(faithful.model))
    want = faithful.text_completion(PROMPTS, temperature=0, max_gen_len=20)
    faithful.model.params.max_batch_size = 2
    faithful.model.reset_buffers(torch.device("cpu"), torch.float32)
    assert fast.text_completion(PROMPTS[:2], temperature=0, max_gen_len=20) == want[:2]
    faithful.model.params.max_seq_len = 400  # longer than the RoPE table the fast path started with
    faithful.model.reset_buffers(torch.device("cpu"), torch.float32)
    long_want = faithful.text_completion(PROMPTS[1:2], temperature=0, max_gen_len=300, logprobs=True)
    long_got = fast.text_completion(PROMPTS[1:2], temperature=0, max_gen_len=300, logprobs=True)
    assert_same(long_want, long_got)
    assert len(long_got[0]["tokens"]) > 256
