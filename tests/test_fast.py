"""The fast path gives the faithful path's answers (float32 on CPU; CUDA graphs on GPU)."""

import copy

import pytest
import torch

from llama import Llama
from llama.fast import FaithfulDecoder, FastDecoder
from llama.fast.modules import SideBySide
from tests.conftest import TOKENIZER, torchrun

PROMPTS = ["Hello world", "I believe the meaning of life is", "你好", "Once upon a time, in a land far away"]


@pytest.fixture(scope="module")
def pair(ckpts, build):
    """The same weights (max_seq_len 300, past one 256-position KV bucket) on both paths."""
    return build(ckpts["gqa1"], max_seq_len=300, fast=False), build(ckpts["gqa1"], max_seq_len=300, fast=True)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        assert len(x["logprobs"]) == len(y["logprobs"])
        torch.testing.assert_close(x["logprobs"], y["logprobs"], rtol=0, atol=1e-4)


def test_transform_joins_the_projections(pair):
    faithful, fast = pair
    a, b = faithful.model.layers[0], fast.model.layers[0]
    assert a.attention.wqkv is None and b.attention.wq is None and b.feed_forward.w1 is None
    # on the CPU the joined projections keep their parts' weights (no copy); on a GPU one weight
    qkv = b.attention.wqkv.linear
    assert isinstance(qkv, SideBySide) == (qkv.weights()[0].device.type == "cpu")
    want = [a.attention.wq.weight, a.attention.wk.weight, a.attention.wv.weight]
    assert torch.equal(torch.cat(qkv.weights()), torch.cat(want))
    w13 = b.feed_forward.w13.linear
    assert torch.equal(torch.cat(w13.weights()), torch.cat([a.feed_forward.w1.weight, a.feed_forward.w3.weight]))
    assert w13.gated
    assert isinstance(b.attention_norm, torch.nn.Identity)  # the norm runs inside the projection after it
    assert torch.equal(b.attention.wqkv.norm.weight, a.attention_norm.weight)
    assert any(k.startswith("layers.0.attention.wqkv.linear.") for k in fast.model.state_dict())
    with pytest.raises(RuntimeError, match="transformed for the fast path already"):
        from llama.fast import transform

        transform(fast.model)


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
    want, _ = Llama(faithful.model, eos_tok, faithful.decoder).generate([prompt], 12, temperature=0)
    got, _ = Llama(fast.model, eos_tok, fast.decoder).generate([prompt], 12, temperature=0)
    assert got == want and len(got[0]) < 12


def test_calls_in_a_row_with_other_sizes(pair):
    faithful, fast = pair
    for prompts, n in [(PROMPTS, 30), (PROMPTS[:1], 5), (PROMPTS[2:], 50), (PROMPTS[:2] * 2, 3)]:
        want = faithful.text_completion(prompts, temperature=0, max_gen_len=n)
        assert fast.text_completion(prompts, temperature=0, max_gen_len=n) == want


def test_sampling_makes_the_same_draws(pair):
    """Same RNG calls and, where the distribution is not near a tie, the same picks. Random
    weights give near-uniform distributions, where float rounding alone can move a draw, so
    the logits are sharpened (output weights x 4 in both models) for the comparison."""
    faithful, fast = pair
    heads = [faithful.model.output.weight, fast.model.output.weight]
    saved = [w.clone() for w in heads]
    for w in heads:
        w.mul_(4)
    try:
        torch.manual_seed(3)
        want = faithful.text_completion(PROMPTS, max_gen_len=20)
        state = torch.get_rng_state()
        torch.manual_seed(3)
        assert fast.text_completion(PROMPTS, max_gen_len=20) == want
        assert torch.equal(torch.get_rng_state(), state)
    finally:
        for w, s in zip(heads, saved):
            w.copy_(s)


def test_build_switch(ckpts, build):
    assert isinstance(build(ckpts["gqa1"]).decoder, FaithfulDecoder)  # CPU default for 16-bit weights
    assert isinstance(build(ckpts["gqa1"], quantize="int8").decoder, FaithfulDecoder)
    assert isinstance(build(ckpts["gqa1"], quantize="int4").decoder, FastDecoder)  # and for int4 the fast path
    assert isinstance(build(ckpts["gqa1"], quantize="int4", fast=False).decoder, FaithfulDecoder)
    llama = build(ckpts["gqa1"], fast=True)
    assert isinstance(llama.decoder, FastDecoder) and not llama.decoder.cuda_graphs


def test_cache_set_up_again_for_other_sizes(ckpts, build):
    faithful = build(ckpts["gqa1"], max_seq_len=64)
    fast = build(ckpts["gqa1"], max_seq_len=64, fast=True)
    want = faithful.text_completion(PROMPTS, temperature=0, max_gen_len=20)
    fast.decoder.setup_cache(2, 64)
    assert fast.text_completion(PROMPTS[:2], temperature=0, max_gen_len=20) == want[:2]
    with pytest.raises(ValueError, match="3 prompts but max_batch_size is 2"):
        fast.text_completion(PROMPTS[:3], temperature=0, max_gen_len=2)
    for llama in (faithful, fast):
        llama.decoder.setup_cache(1, 400)  # longer than the RoPE table either started with
    long_want = faithful.text_completion(PROMPTS[1:2], temperature=0, max_gen_len=300, logprobs=True)
    long_got = fast.text_completion(PROMPTS[1:2], temperature=0, max_gen_len=300, logprobs=True)
    assert_same(long_want, long_got)
    assert len(long_got[0]["tokens"]) > 256


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
    def make(fast):
        return Llama.build(ckpts["wide1"], TOKENIZER, max_seq_len=600, max_batch_size=4, device="cuda",
                           dtype="float32", fast=fast)

    return make(False), make(True)


@pytest.mark.gpu
def test_cuda_graph_decode_matches_faithful_float32(gpu_pair):
    """float32 on CUDA: cuBLAS and SDPA in place of the Triton kernels (16-bit only), as CUDA graphs."""
    faithful, fast = gpu_pair
    assert fast.decoder.cuda_graphs
    kw = dict(temperature=0, max_gen_len=500, logprobs=True)
    for prompts in (PROMPTS[:1], PROMPTS):
        want = faithful.text_completion(prompts, **kw)
        got = fast.text_completion(prompts, **kw)
        for x, y in zip(want, got):
            assert x["tokens"] == y["tokens"]
            torch.testing.assert_close(x["logprobs"], y["logprobs"], rtol=0, atol=2e-3)  # TF32/flash rounding
    assert set(fast.decoder.graphs) == {1, 2, 4}  # recorded at build, a graph per batch-size bucket


def greedy_agreement(decoder_a, decoder_b, tokens: torch.Tensor, prompt_len: int) -> float:
    """Fraction of positions where both decoders' argmax next token agrees, each fed the same
    tokens (teacher forcing: a free-running comparison means nothing after one divergence)."""
    picks = []
    for decoder in (decoder_a, decoder_b):
        out = [decoder(tokens[:, :prompt_len], 0, False)[:, -1].argmax(-1)]
        for pos in range(prompt_len, tokens.shape[1] - 1):
            out.append(decoder(tokens[:, pos : pos + 1], pos, False)[:, -1].argmax(-1))
        picks.append(torch.stack(out, dim=1))
    return (picks[0] == picks[1]).float().mean().item()


@pytest.mark.gpu
@pytest.mark.parametrize("ckpt", ["wide1", "hd128"])
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_cuda_kernels_bf16_agreement(ckpts, quantize, ckpt):
    """bf16 with the Triton kernels (GEMV with norm and residual, RoPE and cache, decode attention
    at head size 128) against the faithful path on the same (quantized) weights, 1 and 4 rows."""
    def make(fast):
        return Llama.build(ckpts[ckpt], TOKENIZER, max_seq_len=300, max_batch_size=4, device="cuda",
                           dtype="bfloat16", fast=fast, quantize=quantize, group_size=32)

    faithful, fast = make(False), make(True)
    prompts = [faithful.tokenizer.encode(p, bos=True, eos=False)[:3] for p in PROMPTS]
    never_stops = copy.copy(faithful.tokenizer)
    never_stops.eos_id = -100
    seqs, _ = Llama(faithful.model, never_stops, faithful.decoder).generate(prompts, 250, temperature=0, echo=True)
    tokens = torch.tensor([s[:250] for s in seqs], device="cuda")
    for rows in (1, 4):
        with torch.inference_mode():
            rate = greedy_agreement(faithful.decoder, fast.decoder, tokens[:rows], prompt_len=3)
        print(f"bf16 teacher-forced greedy agreement, fast vs faithful, {quantize or 'bf16'}, {rows} row(s): {rate:.3f}")
        assert rate > 0.9


def test_cpu_attention_of_one_query_in_16_bits_is_the_float32_one_rounded():
    from llama import kernels
    from llama.kernels import reference as R

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 8, 16, generator=g).to(torch.bfloat16)
    kv = torch.randn(2, 3, 20, 2, 16, generator=g).to(torch.bfloat16)
    positions = torch.tensor([[5], [9]])
    got = kernels.cache_attention(q, kv, None, positions, 10, 4)
    want = R.cache_attention(q.float(), kv.float(), None, positions, 10, 4).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    assert not torch.equal(R.cache_attention(q, kv, None, positions, 10, 4), want)  # (16-bit math differs)
