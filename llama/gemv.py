"""y = x @ W.T for a few rows of x, as one Triton kernel on CUDA: W in bf16/fp16, or int8 with a
scale per output row.

Decoding at batch 1 is a chain of matrix-vector products whose speed is the speed at which
the weights are read. On an H100 at Llama's shapes cuBLAS reads bf16 weights at 2.1-2.8
TB/s, this kernel at 2.5-3.1; torch's own `_weight_int8pack_mm` reads int8 weights at about
100 GB/s, this kernel at 2.3-2.7 TB/s (`benchmarks/gemv_kernels.py`). It reads each weight
once, in wide tiles, and sums over K only at the end. It takes one row of x for float
weights and up to MAX_ROWS for int8 ones. It is registered as the custom op `llama::gemv`,
so torch.compile and CUDA graphs see one opaque kernel. Other products go to cuBLAS
(`linear`, `QuantLinear`).
"""

import functools
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

MAX_ROWS = 8  # int8 weights; 16-bit float weights: one row (FLOAT_MAX_ROWS)
FLOAT_MAX_ROWS = 1  # at 8 rows the kernel runs at half cuBLAS's speed (benchmarks/RESULTS.md)
FLOAT_DTYPES = (torch.bfloat16, torch.float16)

# (BLOCK_N, BLOCK_K, warps, stages): rows of weights per program, columns per step.
_CONFIGS = [(4, 1024, 4, 3), (8, 512, 4, 3), (8, 1024, 4, 2), (16, 256, 4, 3), (16, 512, 4, 2),
            (16, 512, 8, 3), (32, 256, 4, 3), (32, 256, 8, 2), (16, 1024, 8, 2), (64, 128, 4, 3),
            (4, 512, 4, 4), (8, 256, 4, 4), (2, 1024, 4, 4), (4, 2048, 8, 2)]


_AVAILABLE = None  # set by available(): a plain value, which compiled code reads without a call


def available() -> bool:
    """True when the kernel can run here (CUDA, Triton, torch.library.custom_op). Asked lazily:
    querying CUDA at import would get in the way of processes forked later."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = (torch.cuda.is_available() and hasattr(torch.library, "custom_op")
                      and importlib.util.find_spec("triton") is not None)
    return _AVAILABLE


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `linear(x, w)` runs this kernel: CUDA, a single row (FLOAT_MAX_ROWS), matching
    16-bit float weights stored row by row."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not (w.is_cuda and w.dtype in FLOAT_DTYPES and x.dtype == w.dtype and w.dim() == 2
            and w.stride(1) == 1 and w.stride(0) == w.shape[1] and 0 < rows <= FLOAT_MAX_ROWS):
        return False
    # In compiled code the fast path has asked available() already, so this reads a value.
    return _AVAILABLE if _AVAILABLE is not None else available()


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in _CONFIGS]

    @triton.autotune(configs=configs, key=["N", "K", "BLOCK_M", "HAS_SCALE"])
    @triton.heuristics({"EVEN": lambda a: a["N"] % a["BLOCK_N"] == 0 and a["K"] % a["BLOCK_K"] == 0})
    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, HAS_SCALE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        if BLOCK_M == 1:
            # products summed over K only once, at the end
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                if EVEN:
                    w = tl.load(w_ptr + rn[:, None] * K + rk[None, :])
                    x = tl.load(x_ptr + rk)
                else:
                    k_ok = rk < K
                    w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
                    x = tl.load(x_ptr + rk, mask=k_ok, other=0.0)
                acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            y = tl.sum(acc, axis=1)
            if HAS_SCALE:
                y = y * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
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
            if HAS_SCALE:
                acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & n_ok[None, :])

    return gemv_kernel


def _launch(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    import triton

    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _kernel()[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x.contiguous(), w, w if scale is None else scale, y, m, n, k,
        HAS_SCALE=scale is not None, BLOCK_M=triton.next_power_of_2(m))
    return y


if hasattr(torch.library, "custom_op"):  # torch >= 2.4
    _launch = torch.library.custom_op("llama::gemv", mutates_args=())(_launch)

    @_launch.register_fake
    def _(x, w, scale):
        return x.new_empty((x.shape[0], w.shape[0]))


def mm(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(M, K) x, M <= MAX_ROWS, (N, K) contiguous w -> (M, N) in x's dtype: int8 w with its (N,)
    scale, or 16-bit float w (no scale)."""
    return _launch(x, w, scale)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for x (..., K): this kernel where `usable`, else cuBLAS."""
    if not usable(x, w):
        return F.linear(x, w)
    return mm(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[0])
