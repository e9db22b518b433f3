import pytest
import torch
import torch.nn.functional as F

from llama import ModelArgs, Transformer
from llama.model import RMSNorm, Step, apply_rope, apply_rotary_emb, precompute_freqs_cis, repeat_kv, rope_table


@pytest.mark.parametrize(
    "params, hidden",
    [
        ({"dim": 4096, "multiple_of": 256}, 11008),  # 7B
        ({"dim": 5120, "multiple_of": 256}, 13824),  # 13B
        ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3}, 28672),  # 70B
    ],
)
def test_ffn_hidden_rule(params, hidden):
    assert ModelArgs(**params).ffn_hidden_dim == hidden


def test_from_params_warns_on_unknown_keys():
    with pytest.warns(UserWarning, match="not_a_key"):
        args = ModelArgs.from_params({"dim": 64, "n_heads": 4, "not_a_key": 1}, max_seq_len=8)
    assert (args.dim, args.max_seq_len, args.kv_heads, args.head_dim) == (64, 8, 4, 16)


def test_rmsnorm_matches_float64():
    x = torch.randn(3, 5, 16)
    norm = RMSNorm(16, eps=1e-5)
    norm.weight.data = torch.randn(16)
    x64 = x.double()
    want = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), want, rtol=1e-5, atol=1e-6)


def test_rope_depends_on_relative_position_only():
    freqs = precompute_freqs_cis(16, 64)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def dot(m, n):
        qm, _ = apply_rotary_emb(q, q, freqs[m : m + 1])
        kn, _ = apply_rotary_emb(k, k, freqs[n : n + 1])
        return (qm * kn).sum()

    torch.testing.assert_close(dot(3, 1), dot(12, 10))
    torch.testing.assert_close(dot(0, 0), (q * k).sum())
    assert not torch.allclose(dot(3, 1), dot(3, 2))


def test_repeat_kv_is_repeat_interleave():
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(repeat_kv(x, 3), torch.repeat_interleave(x, 3, dim=2))


def tiny_model(**kw):
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=100, multiple_of=16, max_batch_size=2, max_seq_len=16, **kw)
    model = Transformer(args)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    return model


def test_incremental_decode_matches_full_pass():
    model = tiny_model(n_kv_heads=2)
    tokens = torch.randint(0, 100, (2, 10))
    full = model(tokens, 0)
    assert full.shape == (2, 10, 100) and full.dtype == torch.float32
    model.setup_cache(2, 16)
    step = [model(tokens[:, :4], 0)]
    step += [model(tokens[:, i : i + 1], i) for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(step, dim=1), full, rtol=1e-4, atol=1e-4)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = tiny_model(n_kv_heads=2)
    mha = tiny_model()
    state = gqa.state_dict()
    for i in range(2):
        for name in ("wk", "wv"):
            w = state[f"layers.{i}.attention.{name}.weight"].view(2, 8, 32)  # (kv_heads, head_dim, dim)
            state[f"layers.{i}.attention.{name}.weight"] = torch.repeat_interleave(w, 2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 100, (2, 7))
    torch.testing.assert_close(mha(tokens, 0), gqa(tokens, 0), rtol=1e-4, atol=1e-4)


def test_attention_matches_sdpa_in_float64():
    model = tiny_model(n_kv_heads=2).double()
    attn = model.layers[0].attention
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    rope = model.rope[None, :6]
    mask = torch.triu(torch.full((6, 6), float("-inf"), dtype=torch.float64), diagonal=1)
    got = attn(x, Step(0, rope, mask))
    xq, xk, xv = attn.qkv(x)
    xq, xk = apply_rope(xq, rope), apply_rope(xk, rope)
    k, v = repeat_kv(xk, 2), repeat_kv(xv, 2)
    o = F.scaled_dot_product_attention(xq.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    want = attn.wo(o.transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # RoPE runs in float32, as in the reference


def test_score_is_the_cached_forward_without_the_cache():
    model = tiny_model(n_kv_heads=2)
    tokens = torch.randint(0, 100, (2, 9))
    before = model.layers[0].attention.cache.kv.clone()
    scored = model.score(tokens)
    assert torch.equal(model.layers[0].attention.cache.kv, before)
    torch.testing.assert_close(scored, model(tokens, 0), rtol=1e-5, atol=1e-5)


def test_rope_table_is_the_reference_complex_table():
    assert torch.equal(rope_table(16, 64), torch.view_as_real(precompute_freqs_cis(16, 64)))
