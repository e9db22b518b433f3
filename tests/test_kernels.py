"""The Triton kernels against their pure-torch definitions (`llama.kernels.reference`).

On a CUDA machine they run on the GPU in bf16; elsewhere, where Triton is installed, in
Triton's interpreter on the CPU in fp16 (its bf16 products are not exact).
"""

import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton compiles anything
if not CUDA and importlib.util.find_spec("triton") is None:
    pytest.skip("needs a CUDA GPU or Triton's interpreter", allow_module_level=True)

from llama import quant  # noqa: E402
from llama.kernels import reference as R  # noqa: E402
from llama.model import rope_table  # noqa: E402

# On a CUDA machine these are GPU tests (`-m gpu` selects them); elsewhere they run in the interpreter.
pytestmark = [pytest.mark.gpu] if CUDA else []
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float16


@pytest.fixture(scope="module")
def T():
    from llama.kernels import triton_kernels

    return triton_kernels


def close(got, want, rel=2e-2):
    assert got.shape == want.shape
    err = (got.float() - want.float()).abs().max().item()
    assert err <= rel * want.float().abs().max().item() + 1e-6, err


def weights(n, k):
    torch.manual_seed(n + k)
    return torch.randn(n, k, device=DEVICE) * 0.05


@pytest.mark.parametrize("n,k", [(48, 256), (96, 1000), (4096, 4096)] if CUDA else [(48, 256), (64, 1024), (40, 264)])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("fused", [None, "norm", "norm+residual"])
def test_gemv_float_int8_int4(T, n, k, gated, fused):
    w = weights(n, k)
    x = torch.randn(1, k, device=DEVICE, dtype=DTYPE)
    g = (1 + 0.1 * torch.randn(k, device=DEVICE)).to(DTYPE)
    out = n // 2 if gated else n
    r = torch.randn(1, out, device=DEVICE, dtype=DTYPE) if fused == "norm+residual" else None
    norm = (g, 1e-5) if fused else None
    xr = R.rms_norm(x, g, 1e-5).float() if fused else x.float()

    def want(wf):
        y = xr @ wf.t()
        y = R.silu_mul(y) if gated else y
        return y if r is None else y + r.float()

    close(T.gemv(x, w.to(DTYPE), None, None, "float", gated, norm=norm, residual=r), want(w.to(DTYPE).float()))
    q, s = quant.quantize_int8(w)
    close(T.gemv(x, q, s, None, "int8", gated, norm=norm, residual=r), want(R.dequantize_int8(q, s)))
    for group in (32, 128) if k % 128 == 0 else (8,):
        p, sc, z = quant.quantize_int4(w, group)
        close(T.gemv(x, p, sc, z, "int4", gated, group, norm=norm, residual=r), want(R.dequantize_int4(p, sc, z)))


@pytest.mark.parametrize("rows", [2, 5, 17, 64])
@pytest.mark.parametrize("mode,group,fold", [("int8", 1, None), ("int4", 32, True), ("int4", 128, True),
                                             ("int4", 32, False), ("int4", 128, False)])
def test_quantized_products_with_several_rows(T, rows, mode, group, fold, monkeypatch):
    """int4 both ways: each tile's product scaled after (FOLD, a tile within one group) and the
    weights dequantized before it, a tile spanning several groups."""
    from llama.kernels import tuning

    if fold is not None:
        monkeypatch.setattr(tuning, "QMM_DEFAULT", dict(tuning.QMM_DEFAULT, BLOCK_K=256, FOLD=fold))
    w = weights(96, 512)
    x = torch.randn(rows, 512, device=DEVICE, dtype=DTYPE)
    stored = quant.quantize_weight("weight", w, quant.Spec(mode, max(group, 1)))
    if mode == "int8":
        args, want = (stored["weight"], stored["weight_scale"], None), R.dequantize_int8(stored["weight"], stored["weight_scale"])
    else:
        args = (stored["weight"], stored["weight_scales"], stored["weight_zeros"])
        want = R.dequantize_int4(*args)
    close(T.qmm(x, *args, mode, group), x.float() @ want.t())
    close(T.chunked_dequant_mm(x, *args, mode, group), x.float() @ want.t())


def test_norm_and_silu(T):
    x = torch.randn(3, 5, 64, device=DEVICE, dtype=DTYPE)
    w = torch.randn(64, device=DEVICE, dtype=DTYPE)
    close(T.rms_norm(x, w, 1e-5), R.rms_norm(x, w, 1e-5))
    y = torch.randn(3, 5, 256, device=DEVICE, dtype=DTYPE)
    close(T.silu_mul(y), R.silu_mul(y))


@pytest.mark.parametrize("with_rows", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
def test_rope_cache_write_and_decode_attention(T, with_rows, heads, kv_heads):
    torch.manual_seed(0)
    bs, d, max_len = 3, 32, 200
    rope = rope_table(d, 2 * max_len).to(DEVICE)
    proj = torch.randn(bs, 1, (heads + 2 * kv_heads) * d, device=DEVICE, dtype=DTYPE)
    xq, xk, xv = proj.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)  # views of one projection, as in the model
    xq, xk, xv = (t.view(bs, 1, -1, d) for t in (xq, xk, xv))  # views, as the model makes them
    rows = torch.tensor([2, 0, 3], device=DEVICE) if with_rows else None
    positions = torch.tensor([[5], [70], [199]], device=DEVICE)
    kv = torch.randn(2, 4, max_len, kv_heads, d, device=DEVICE, dtype=DTYPE)
    kv_ref = kv.clone()
    q, k = T.rope_and_store(xq, xk, xv, rope, positions, kv, rows)
    q_ref, k_ref = R.rope_and_store(xq, xk, xv, rope, positions, kv_ref, rows)
    close(q, q_ref, 1e-2)
    close(k, k_ref, 1e-2)
    close(kv, kv_ref, 1e-2)
    close(T.decode_attention(q, kv, rows, positions), R.cache_attention(q_ref, kv_ref, rows, positions, max_len,
                                                                         heads // kv_heads))
