"""y = (x @ q.T) * scale for int8 weights q (N, K) and a few rows of x, as one Triton kernel on CUDA.

torch's own `_weight_int8pack_mm` runs at about 100 GB/s on an H100 at Llama's shapes
(`benchmarks/quant_kernels.py`), slower than the bf16 product it replaces, and a
dequantize-then-matmul reads the weights twice. This kernel reads each int8 weight once.
It is registered as the custom op `llama::int8_mm`, so torch.compile and CUDA graphs see
one opaque kernel. Batches of more than MAX_ROWS rows go through cuBLAS instead
(`QuantLinear`).
"""

import functools
import importlib.util

import torch

MAX_ROWS = 8

# (BLOCK_N, BLOCK_K, warps, stages): rows of weights per program, columns per step.
_CONFIGS = [(4, 1024, 4, 3), (8, 512, 4, 3), (8, 1024, 4, 2), (16, 256, 4, 3), (16, 512, 4, 2),
            (16, 512, 8, 3), (32, 256, 4, 3), (32, 256, 8, 2), (16, 1024, 8, 2), (64, 128, 4, 3)]


def available() -> bool:
    """True when the kernel can run here (CUDA, Triton, torch.library.custom_op)."""
    if not (torch.cuda.is_available() and hasattr(torch.library, "custom_op")):
        return False
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in _CONFIGS]

    @triton.autotune(configs=configs, key=["N", "K", "BLOCK_M"])
    @triton.jit
    def int8_mm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if BLOCK_M == 1:
            # products summed over K only once, at the end
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < K
                w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
                x = tl.load(x_ptr + rk, mask=k_ok, other=0.0)
                acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            y = tl.sum(acc, axis=1) * scale
            tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)
        else:
            rm = tl.arange(0, BLOCK_M)
            m_ok = rm < M
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < K
                w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
                x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            y = acc * scale[None, :]
            tl.store(y_ptr + rm[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & n_ok[None, :])

    return int8_mm_kernel


def _launch(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    import triton

    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _kernel()[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x.contiguous(), w, scale, y, m, n, k, BLOCK_M=triton.next_power_of_2(m))
    return y


if hasattr(torch.library, "custom_op"):  # torch >= 2.4
    _launch = torch.library.custom_op("llama::int8_mm", mutates_args=())(_launch)

    @_launch.register_fake
    def _(x, w, scale):
        return x.new_empty((x.shape[0], w.shape[0]))


def int8_mm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(M, K) x, M <= MAX_ROWS, int8 (N, K) w contiguous, (N,) scale -> (M, N) in x's dtype."""
    return _launch(x, w, scale)
