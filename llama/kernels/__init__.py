"""The fast path's products and attention, chosen per device and shape in this one place.

Each function here has a pure-torch definition in `llama.kernels.reference`, which runs
where no kernel applies and which the kernels are tested against. On CUDA with Triton,
small products (decode steps) and the decode attention run in this package's Triton
kernels (`triton_kernels`); large products go to cuBLAS. On the CPU, one row times a
16-bit weight runs in code torch.compile writes (`cpu_gemv`), quantized products of many
rows dequantize tiles (`cpu`), the rest is torch's.

Why hand-written kernels rather than torch.compile: compiling the decode step costs
10-25 s in every fresh process (3 s and more even with warm caches), which is longer
than a whole example run; these kernels are compiled once per machine by Triton, cached
on disk (`llama.cache`), and each decode step is replayed as one CUDA graph.
"""

import contextlib
import importlib.util
import threading
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from llama import cache, distributed
from llama.kernels import cpu, cpu_gemv, reference

_AVAILABLE = None


def available() -> bool:
    """True where the Triton kernels run: CUDA and Triton present. Asked lazily (querying CUDA at
    import would get in the way of processes forked later)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
    return _AVAILABLE


def _triton():
    """The Triton kernels module, imported on first use (with Triton's cache in ours)."""
    global _TRITON
    if _TRITON is None:
        cache.use_for_triton()
        _TRITON = importlib.import_module("llama.kernels.triton_kernels")
    return _TRITON


_TRITON = None
_PRELOAD: Optional[threading.Thread] = None


def preload(device: torch.device, launches: Optional[str] = None) -> None:
    """Starts importing the Triton kernels, what Triton does once a process before its first
    kernel, and the kernels an earlier process noted in the start-up cache entry `launches`
    (`ahead.replay`), in a thread: to run while the weights load (once; nothing without CUDA
    and Triton)."""
    global _PRELOAD
    if _PRELOAD is None and device.type == "cuda" and available():
        def work():
            module = _triton()
            module.warm_up(device)
            calls = cache.load_json(launches) if launches else None
            if isinstance(calls, list):
                module.replay(calls, module)

        _PRELOAD = threading.Thread(target=work, name="llama-triton-preload", daemon=True)
        _PRELOAD.start()


def wait_for_preload() -> None:
    """Returns once `preload`'s thread, if one was started, has finished."""
    if _PRELOAD is not None:
        _PRELOAD.join()


@contextlib.contextmanager
def noting_launches(entry: str):
    """Within: the launches compiled ahead (from this thread) are noted (`ahead.noting`); on
    leaving without an error they are kept in the start-up cache entry `entry`, for `preload`
    in later processes (written only when it changed). Nothing happens without CUDA and Triton."""
    if not available():
        yield
        return
    with _triton().noting() as calls:
        yield
    if calls and cache.load_json(entry) != calls:
        cache.save_json(entry, calls)


def compiling_ahead():
    """A context within which the Triton kernels launched (from this thread) are compiled, many
    at a time, instead of run (`llama.kernels.ahead`); nothing happens differently without them."""
    if not available():
        return contextlib.nullcontext()
    wait_for_preload()
    return _triton().compiling()


FLOAT_DTYPES = (torch.bfloat16, torch.float16)
QUANT_DEQUANT_ROWS = 256  # quantized weights, from this many rows: dequantize to 16 bit and use cuBLAS


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _gemv_ok(x: torch.Tensor, residual) -> bool:
    return (x.is_cuda and x.dtype in FLOAT_DTYPES and _rows(x) == 1 and x.stride(-1) == 1
            and (residual is None or residual.is_contiguous()) and available())


def linear(x: torch.Tensor, w: torch.Tensor, gated: bool = False, norm=None, residual=None) -> torch.Tensor:
    """x @ w.T for x (..., K) and a 16-bit or float32 weight (N, K). `gated`: w is [w1; w3] and the
    result silu(x @ w1.T) * (x @ w3.T) (..., N // 2); `norm` (weight, eps): x RMSNorm'ed first;
    `residual`: added to the result. One GEMV kernel for one row on CUDA (`cpu_gemv` on the CPU);
    cuBLAS (torch's matmul) otherwise."""
    if _gemv_ok(x, residual) and w.dtype == x.dtype and w.is_contiguous():
        y = _triton().gemv(x.reshape(1, -1), w, None, None, "float", gated, norm=norm,
                           residual=None if residual is None else residual.reshape(1, -1))
        return y.reshape(*x.shape[:-1], y.shape[-1])
    if norm is not None:
        x = rms_norm(x, *norm)
    if _rows(x) == 1 and cpu_gemv.usable(x, w):
        y = cpu_gemv.gemv(x, w).reshape(*x.shape[:-1], w.shape[0])
    else:
        y = F.linear(x, w)
    y = silu_mul(y) if gated else y
    return y if residual is None else residual + y


def silu_mul(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of y = [gate | up]."""
    if y.is_cuda and y.dtype in FLOAT_DTYPES and available() and y.is_contiguous():
        return _triton().silu_mul(y)
    return reference.silu_mul(y)


def quantized_linear(x: torch.Tensor, mode: str, weight: torch.Tensor, scale: torch.Tensor,
                     zeros: Optional[torch.Tensor], group: int, gated: bool = False, norm=None,
                     residual=None) -> Optional[torch.Tensor]:
    """x @ W.T for a weight in its stored quantized form (`llama.layout.stored_form`) where a
    CUDA kernel applies (16-bit x): the GEMV for a row, a tensor-core kernel for a few, the
    weight dequantized to 16 bit and cuBLAS for many. `gated`, `norm`, `residual` as in
    `linear`. None where no kernel applies."""
    k = x.shape[-1]
    if not (x.is_cuda and x.dtype in FLOAT_DTYPES and k % 8 == 0 and (mode == "int8" or k % group == 0)
            and weight.is_contiguous() and available()):
        return None
    t = _triton()
    if _gemv_ok(x, residual):
        y = t.gemv(x.reshape(1, -1), weight, scale, zeros, mode, gated, group, norm=norm,
                   residual=None if residual is None else residual.reshape(1, -1))
        return y.reshape(*x.shape[:-1], y.shape[-1])
    if norm is not None:
        x = rms_norm(x, *norm)
    x2 = x.reshape(-1, k)
    if x2.shape[0] < QUANT_DEQUANT_ROWS and (mode == "int8" or group >= 32):
        y = t.qmm(x2, weight, scale, zeros, mode, group)
    else:
        y = t.chunked_dequant_mm(x2, weight, scale, zeros, mode, group)
    y = silu_mul(y) if gated else y
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if residual is None else residual + y


# On the CPU, quantized products of at least this many rows dequantize tile by tile and use
# torch's matmul (`llama.kernels.cpu`); fewer rows use torch's int8/int4 products, which read
# each weight byte once (measured at the 1.1B shape, 2 threads: benchmarks/RESULTS.md).
CPU_DEQUANT_ROWS = {"int8": 16, "int4": 128}
_NOTICED = set()


def cpu_quantized_mm(x: torch.Tensor, mode: str, weight: torch.Tensor, scale: torch.Tensor,
                     group: int) -> Optional[torch.Tensor]:
    """x (M, K) @ W.T on the CPU for a weight in the form of torch's CPU product (int8: (N, K) and
    scales (N,) in x's dtype; int4: `_convert_weight_to_int4pack_for_cpu`'s, with scales and
    zeros (K // group, N, 2)) where M is many rows: W dequantized a tile at a time, torch's
    matmul. None where torch's quantized product is the one to use."""
    if x.device.type != "cpu" or _rows(x) < CPU_DEQUANT_ROWS[mode]:
        return None
    if mode == "int8":
        return cpu.int8_mm(x, weight, scale)
    if cpu.int4pack_layout() == "known":
        return cpu.int4pack_mm(x, weight, group, scale) if weight.shape[0] % 64 == 0 else None
    notice_once("int4 prompts on this CPU use torch's int4 product (slower for many tokens): its packed "
                f"layout here is not the one llama.kernels.cpu reads ({cpu.int4pack_layout()})")
    return None


def notice_once(message: str) -> None:
    """`message` on one line of rank 0's stderr, the first time only in this process."""
    if message not in _NOTICED:
        _NOTICED.add(message)
        distributed.log(message)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda and x.dtype in FLOAT_DTYPES and available() and x.is_contiguous() and weight.dtype == x.dtype:
        return _triton().rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def rope_and_store(xq, xk, xv, rope, positions, kv, rows: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k at `positions`, k and v written into the cache; see `reference.rope_and_store`."""
    if xq.is_cuda and xq.dtype in FLOAT_DTYPES and kv.dtype == xq.dtype and _pow2(xq.shape[-1]) and available():
        return _triton().rope_and_store(xq, xk, xv, rope, positions, kv, rows)
    return reference.rope_and_store(xq, xk, xv, rope, positions, kv, rows)


def causal_attention(xq, xk, xv, n_rep: int) -> torch.Tensor:
    """Causal attention among new tokens from position 0 (SDPA: flash attention on CUDA)."""
    return reference.causal_attention(xq, xk, xv, n_rep)


def cache_attention(xq, kv, rows: Optional[torch.Tensor], positions, kv_len: int, n_rep: int) -> torch.Tensor:
    """Attention over the cache up to each token's position. One token a row on CUDA: a Triton
    kernel that reads only positions up to the row's own (so kv_len does not matter there)."""
    if (xq.is_cuda and xq.shape[1] == 1 and xq.dtype in FLOAT_DTYPES and kv.dtype == xq.dtype and _pow2(xq.shape[-1])
            and available()):
        return _triton().decode_attention(xq, kv, rows, positions)
    if xq.device.type == "cpu" and xq.shape[1] == 1 and xq.dtype in FLOAT_DTYPES:
        # torch's CPU attention of one query runs 3-5x faster in float32 than in 16 bits (2 cores,
        # 90-2000 cached positions: 256 -> 78 us, 3666 -> 748 us; benchmarks/RESULTS.md)
        return reference.cache_attention(xq.float(), kv, rows, positions, kv_len, n_rep).to(xq.dtype)
    return reference.cache_attention(xq, kv, rows, positions, kv_len, n_rep)
