"""Triton kernels for the fast path on CUDA; `llama.kernels` chooses when each runs and
`llama.kernels.reference` defines what each computes.

- `gemv`: y = x @ W.T for one row of x, W in 16 bit, int8 (a scale per output row) or int4
  (a scale and zero per group of input columns), optionally gated (silu(x W1.T) * (x W3.T)
  for W = [W1; W3]). Decoding one sequence is a chain of these; their speed is the speed at
  which the weights stream from memory. Each program reads BLOCK_N rows whole, in tiles of
  BLOCK_K columns, and sums over K once at the end. Quantized values become floats by
  exponent bit tricks, not by conversion instructions, which run at a quarter of the rate
  on these GPUs; int4's scales and zeros are applied once a group, not once a weight.
- `qmm`: the same product for a few rows (2 to 255) on tensor cores, each weight tile
  dequantized to 16 bit in registers (int4 with FOLD: its 4-bit values as 16-bit floats
  by the same bit trick, the group's scale and zero applied to the tile's product).
- `dequantize`: a weight in 16 bit, for products with many rows (cuBLAS).
- `rms_norm`, `silu_mul`, `rope_and_store` (RoPE on q and k, k and v written into the cache
  at each row's position) and `decode_attention` (one new token per row over the cache up
  to its own position, split over the cache for parallelism, then combined).

Launch configurations come from `llama.kernels.tuning` (defaults, or the ones measured on
this GPU and kept in the cache folder), never from autotuning at run time.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from llama.kernels import tuning
from llama.kernels.ahead import compiling, launch, noting, replay, warm_up  # noqa: F401 (the rest: for llama.kernels)

# float32 bit patterns: 2^23 + u for 0 <= u < 2^23
MAGIC = tl.constexpr(0x4B000000)
MAGIC_F = tl.constexpr(8388608.0)


@triton.jit
def _ld(ptr, mask, EVEN: tl.constexpr):
    """A load, masked unless every block is whole."""
    if EVEN:
        v = tl.load(ptr)
    else:
        v = tl.load(ptr, mask=mask, other=0)
    return v


@triton.jit
def _wait_for_inputs(PDL: tl.constexpr):
    """With PDL (the kernel launched as a programmatic dependent launch, Hopper and later):
    waits until the kernel before it has finished and its writes are visible, then lets the
    kernel after it start launching. Every kernel here calls it before it reads an activation
    or writes anything; only weights may be read before."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _ld_x(x_ptr, g_ptr, offs, mask, rstd, NORM: tl.constexpr, EVEN: tl.constexpr):
    """x[offs] in float32; with NORM, RMSNorm'ed as the reference rounds it (x * rstd in the
    input dtype, times the norm weight g, rounded again)."""
    x = _ld(x_ptr + offs, mask, EVEN)
    if NORM:
        xn = (x.to(tl.float32) * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        g = _ld(g_ptr + offs, mask, EVEN).to(tl.float32)
        x = (xn * g).to(x_ptr.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _rstd(x_ptr, K, eps, BLOCK: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) over the K values of x."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
        acc += x * x
    return 1.0 / tl.sqrt(tl.sum(acc, axis=0) / K + eps)


@triton.jit
def _planes(a, b, c, d, BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
    """(BLOCK_N, WORDS, 4): [..., i] is the i-th of a, b, c, d."""
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), (BLOCK_N, WORDS, 4))


@triton.jit
def _rows_dot(x_ptr, g_ptr, rstd, w_ptr, s_ptr, z_ptr, rn, n_ok, K, s_stride,
              FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              NORM: tl.constexpr, EVEN: tl.constexpr):
    """sum_k x[k] * W[n, k] for the rows rn: (BLOCK_N,) float32."""
    if FMT == 0:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = _ld_x(x_ptr, g_ptr, rk, k_ok, rstd, NORM, EVEN)
            w = _ld(w_ptr + rn[:, None] * K + rk[None, :], n_ok[:, None] & k_ok[None, :], EVEN)
            acc += w.to(tl.float32) * x[None, :]
        out = tl.sum(acc, axis=1)
    elif FMT == 1:
        WORDS: tl.constexpr = BLOCK_K // 4
        KW = K // 4
        acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rw = k0 // 4 + tl.arange(0, WORDS)
            w_ok = rw < KW
            words = _ld(w_ptr + rn[:, None] * KW + rw[None, :], n_ok[:, None] & w_ok[None, :], EVEN)
            for j in tl.static_range(4):
                x = _ld_x(x_ptr, g_ptr, rw * 4 + j, w_ok, rstd, NORM, EVEN)
                # byte j of each word, signed -> offset by 128, as the low bits of 2^23 + u
                u = ((words >> (8 * j)) & 0xFF) ^ 0x80
                q = (u | MAGIC).to(tl.float32, bitcast=True) - (MAGIC_F + 128.0)
                acc += q * x[None, :]
        out = tl.sum(acc, axis=1) * _ld(s_ptr + rn, n_ok, EVEN).to(tl.float32)
    else:
        # Byte b of a word holds columns 2b (high nibble) and 2b + 1 (low). Four shifts of the
        # word (<<15, <<7, >>1, >>9: byte b to bits 15-22) bring each byte's high nibble to
        # mantissa bits 19-22 and its low one to bits 15-18; masked and or'ed under exponent 2^4
        # they are the floats 16 + u (high) and 16 + u / 16 (low), exactly. With x of low
        # columns times 16, each product is x u plus 16 x (high) or 256 x (low), and per group
        # W x = scale (D - P) + zero X, where D sums those products, P = sum(24 x) over high
        # columns + sum(264 x) over low ones (the offsets and the 8 of the stored u - 8), and
        # X = sum(x): about three ops a weight, the scale and zero applied once a group.
        WORDS: tl.constexpr = BLOCK_K // 8
        R: tl.constexpr = BLOCK_K // GROUP  # groups a tile
        KW = K // 8
        acc = tl.zeros((BLOCK_N, R), dtype=tl.float32)
        col = tl.arange(0, 8)
        low = (col % 2) == 1
        x_mul = tl.where(low, 16.0, 1.0)
        p_mul = tl.where(low, 264.0, 24.0)
        for k0 in range(0, K, BLOCK_K):
            rw = k0 // 8 + tl.arange(0, WORDS)
            w_ok = rw < KW
            words = _ld(w_ptr + rn[:, None] * KW + rw[None, :], n_ok[:, None] & w_ok[None, :], EVEN)
            v = _planes(words << 15, words << 7, words >> 1, words >> 9, BLOCK_N, WORDS)
            q = tl.reshape(tl.join(v & 0x780000, v & 0x78000), (BLOCK_N, WORDS, 8))
            q = (q | 0x41800000).to(tl.float32, bitcast=True)
            x = _ld_x(x_ptr, g_ptr, rw[:, None] * 8 + col[None, :], w_ok[:, None], rstd, NORM, EVEN)
            d = tl.sum(tl.reshape(q * (x * x_mul[None, :])[None, :, :], (BLOCK_N, R, GROUP)), axis=2)
            xg = tl.sum(tl.reshape(x, (R, GROUP)), axis=1)
            pg = tl.sum(tl.reshape(x * p_mul[None, :], (R, GROUP)), axis=1)
            rg = k0 // GROUP + tl.arange(0, R)
            sz_off = rn[:, None] * s_stride + rg[None, :]
            sz_ok = n_ok[:, None] & (rg < K // GROUP)[None, :]
            scale = _ld(s_ptr + sz_off, sz_ok, EVEN).to(tl.float32)
            zero = _ld(z_ptr + sz_off, sz_ok, EVEN).to(tl.float32)
            acc += scale * (d - pg[None, :]) + zero * xg[None, :]
        out = tl.sum(acc, axis=1)
    return out


@triton.jit
def _gemv_kernel(x_ptr, g_ptr, eps, w_ptr, s_ptr, z_ptr, r_ptr, y_ptr, N, K, H, s_stride,
                 FMT: tl.constexpr, GATED: tl.constexpr, GROUP: tl.constexpr, NORM: tl.constexpr,
                 RESIDUAL: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr = False):
    """y = W @ x for one row x. FMT 0: 16-bit W (N, K); 1: int8 W viewed as int32 words (N, K // 4)
    with scale (N,); 2: int4 W viewed as int32 words (N, K // 8), scales and zeros (N, K // GROUP).
    NORM: x is first RMSNorm'ed with weight g. GATED: rows n and H + n of W give
    y[n] = silu(a) * b (N = H outputs). RESIDUAL: y += r."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    _wait_for_inputs(PDL)
    rstd = 1.0
    if NORM:
        rstd = _rstd(x_ptr, K, eps, 1024)
    y = _rows_dot(x_ptr, g_ptr, rstd, w_ptr, s_ptr, z_ptr, rn, n_ok, K, s_stride, FMT, GROUP, BLOCK_N, BLOCK_K,
                  NORM, EVEN)
    if GATED:
        up = _rows_dot(x_ptr, g_ptr, rstd, w_ptr, s_ptr, z_ptr, rn + H, n_ok, K, s_stride, FMT, GROUP, BLOCK_N,
                       BLOCK_K, NORM, EVEN)
        y = y / (1.0 + tl.exp(-y)) * up
    if RESIDUAL:
        y += _ld(r_ptr + rn, n_ok, EVEN).to(tl.float32)
    if EVEN:
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty))
    else:
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


FORMATS = {"float": 0, "int8": 1, "int4": 2}


def gemv(x: torch.Tensor, w: torch.Tensor, scale, zeros, fmt: str, gated: bool, group: int = 128,
         norm=None, residual=None) -> torch.Tensor:
    """(1, K) x @ W.T -> (1, N) (N // 2 if gated) in x's dtype, W in its stored form; `norm`
    (weight, eps): RMSNorm x first; `residual` (1, N): added to the result."""
    k = x.shape[-1]
    n_rows = w.shape[0]
    n = n_rows // 2 if gated else n_rows
    if fmt in ("int8", "int4"):
        w = w.view(torch.int32)
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    cfg = tuning.gemv_config(fmt, n, k, gated, group)
    block_n, block_k = cfg["BLOCK_N"], cfg["BLOCK_K"]
    s_stride = scale.stride(0) if scale is not None and scale.dim() == 2 else 0
    g, eps = norm if norm is not None else (x, 0.0)
    launch(_gemv_kernel, (triton.cdiv(n, block_n),))(
        x, g, eps, w, scale if scale is not None else w, zeros if zeros is not None else w,
        residual if residual is not None else y, y, n, k, n if gated else 0, s_stride,
        FMT=FORMATS[fmt], GATED=gated, GROUP=group if fmt == "int4" else 1, NORM=norm is not None,
        RESIDUAL=residual is not None, EVEN=n % block_n == 0 and k % block_k == 0,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


@triton.jit
def _qmm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, s_stride,
                FMT: tl.constexpr, GROUP: tl.constexpr, SWAP: tl.constexpr, BF16: tl.constexpr,
                FOLD: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    """y (M, N) = x (M, K) @ dequant(W).T on tensor cores. FMT 1: int8 W (N, K), scale (N,);
    2: int4 W packed (N, K // 2), scales and zeros (N, K // GROUP); with FOLD, BLOCK_K <= GROUP
    (a tile within one group), else BLOCK_K a multiple of GROUP or a part of one. BF16: x is
    bfloat16 (else float16), for the 16-bit form of FOLD's values.

    SWAP: computed as y.T = dequant(W) @ x.T, the weights dequantized in registers as the
    product's first operand, which Hopper's tensor cores take from registers, and x (a few
    rows) as the second, read from shared memory. On the H200 that made int4 products of 16
    and 64 rows 1.2-5x faster and int8's about 10% slower, so int4 products are swapped."""
    _wait_for_inputs(PDL)
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if FMT == 1:
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            w = w.to(x.dtype)
            if SWAP:
                acc += tl.dot(w, tl.trans(x))
            else:
                acc += tl.dot(x, tl.trans(w))
        else:
            HALF: tl.constexpr = BLOCK_K // 2
            rb = k0 // 2 + tl.arange(0, HALF)
            b_ok = rb < K // 2
            packed = tl.load(w_ptr + rn[:, None] * (K // 2) + rb[None, :], mask=n_ok[:, None] & b_ok[None, :], other=0)
            if FOLD:
                g = k0 // GROUP  # BLOCK_K <= GROUP: one group a tile
                scale = tl.load(s_ptr + rn * s_stride + g, mask=n_ok, other=0.0).to(tl.float32)
                zero = tl.load(z_ptr + rn * s_stride + g, mask=n_ok, other=0.0).to(tl.float32)
                # u as the 16-bit float OFF + u (its bits or'ed under the exponent of OFF): the
                # product sums x (OFF + u); W x = scale (that - (OFF + 8) X) + zero X, X = sum(x).
                OFF: tl.constexpr = 128.0 if BF16 else 1024.0
                E16: tl.constexpr = 0x4300 if BF16 else 0x6400
                p16 = packed.to(tl.int16)
                hi = ((p16 >> 4) | E16).to(x.dtype, bitcast=True)
                lo = ((p16 & 0xF) | E16).to(x.dtype, bitcast=True)
                q = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))
                tl.static_assert(SWAP, "FOLD is written for the swapped product (int4's)")
                xs = tl.sum(x.to(tl.float32), axis=1)
                d = tl.dot(q, tl.trans(x))
                acc += scale[:, None] * d + (zero - (OFF + 8.0) * scale)[:, None] * xs[None, :]
            else:
                # R groups a tile (or a part of one: R = 1), each dequantized with its scale and zero
                R: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
                G: tl.constexpr = BLOCK_K // R
                rg = k0 // GROUP + tl.arange(0, R)
                g_ok = n_ok[:, None] & (rg < tl.cdiv(K, GROUP))[None, :]
                scale = tl.load(s_ptr + rn[:, None] * s_stride + rg[None, :], mask=g_ok, other=0.0).to(tl.float32)
                zero = tl.load(z_ptr + rn[:, None] * s_stride + rg[None, :], mask=g_ok, other=0.0).to(tl.float32)
                packed = packed.to(tl.int32)
                hi = ((packed >> 4) | MAGIC).to(tl.float32, bitcast=True) - (MAGIC_F + 8.0)
                lo = ((packed & 0xF) | MAGIC).to(tl.float32, bitcast=True) - (MAGIC_F + 8.0)
                q = tl.reshape(tl.join(hi, lo), (BLOCK_N, R, G))
                w = tl.reshape(q * scale[:, :, None] + zero[:, :, None], (BLOCK_N, BLOCK_K)).to(x.dtype)
                if SWAP:
                    acc += tl.dot(w, tl.trans(x))
                else:
                    acc += tl.dot(x, tl.trans(w))
    if SWAP:
        if FMT == 1:
            acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rm[None, :] * N + rn[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & m_ok[None, :])
    else:
        if FMT == 1:
            acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def qmm(x: torch.Tensor, w: torch.Tensor, scale, zeros, fmt: str, group: int = 128) -> torch.Tensor:
    """(M, K) x @ dequant(W).T -> (M, N) in x's dtype on tensor cores (M from 2 to a few hundred)."""
    m, k = x.shape
    n = w.shape[0]
    x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    cfg = tuning.qmm_config(fmt, m, n, k, group)
    s_stride = scale.stride(0) if scale.dim() == 2 else 0
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    launch(_qmm_kernel, grid)(x, w, scale, zeros if zeros is not None else scale, y, m, n, k, s_stride,
                      FMT=FORMATS[fmt], GROUP=group if fmt == "int4" else 1, SWAP=fmt == "int4",
                      BF16=x.dtype == torch.bfloat16, FOLD=cfg.get("FOLD", False), BLOCK_M=cfg["BLOCK_M"],
                      BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
                      num_stages=cfg["num_stages"])
    return y


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, s_stride, FMT: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    """out (N, K) 16 bit = dequant(W) for rows [pid_n * BLOCK_N, ...) and columns of this program
    (int4: BLOCK_K a multiple of GROUP; each group's scale and zero read once)."""
    _wait_for_inputs(PDL)
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = rn < N, rk < K
    ok = n_ok[:, None] & k_ok[None, :]
    if FMT == 1:
        q = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=ok, other=0).to(tl.float32)
        w = q * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    else:
        # a tile of whole bytes: high and low nibbles interleaved back into column order
        HALF: tl.constexpr = BLOCK_K // 2
        R: tl.constexpr = BLOCK_K // GROUP
        rb = pid_k * HALF + tl.arange(0, HALF)
        b_ok = n_ok[:, None] & (rb < K // 2)[None, :]
        packed = tl.load(w_ptr + rn[:, None] * (K // 2) + rb[None, :], mask=b_ok, other=0).to(tl.int32)
        hi = ((packed >> 4) | MAGIC).to(tl.float32, bitcast=True) - (MAGIC_F + 8.0)
        lo = ((packed & 0xF) | MAGIC).to(tl.float32, bitcast=True) - (MAGIC_F + 8.0)
        q = tl.reshape(tl.join(hi, lo), (BLOCK_N, R, GROUP))
        rg = pid_k * R + tl.arange(0, R)
        g_ok = n_ok[:, None] & (rg < K // GROUP)[None, :]
        scale = tl.load(s_ptr + rn[:, None] * s_stride + rg[None, :], mask=g_ok, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + rn[:, None] * s_stride + rg[None, :], mask=g_ok, other=0.0).to(tl.float32)
        w = tl.reshape(q * scale[:, :, None] + zero[:, :, None], (BLOCK_N, BLOCK_K))
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


# the fastest of six tile shapes on the H200 at the 7B output layer (int4: 3.5 TB/s read and written)
DEQUANT_BLOCKS = {"int8": (16, 256, 4), "int4": (8, 1024, 4)}


def dequantize(w: torch.Tensor, scale, zeros, fmt: str, group: int, dtype: torch.dtype, rows=None) -> torch.Tensor:
    """dequant(W)[rows] (a slice of output rows, default all) in `dtype`, (n, K)."""
    lo, hi = rows if rows is not None else (0, w.shape[0])
    k = w.shape[1] * (2 if fmt == "int4" else 1)
    n = hi - lo
    out = torch.empty((n, k), dtype=dtype, device=w.device)
    s_stride = scale.stride(0) if scale.dim() == 2 else 0
    block_n, block_k, warps = DEQUANT_BLOCKS[fmt]
    if fmt == "int4":
        block_k = max(block_k, group)
    launch(_dequant_kernel, (triton.cdiv(n, block_n), triton.cdiv(k, block_k)))(
        w[lo:hi], scale[lo:hi], (zeros if zeros is not None else scale)[lo:hi], out, n, k, s_stride,
        FMT=FORMATS[fmt], GROUP=group if fmt == "int4" else 1, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps)
    return out


CHUNK_ELEMENTS = 32 << 20  # dequantized 16-bit scratch per product (64 MB), whatever the layer's size


def chunked_dequant_mm(x: torch.Tensor, w: torch.Tensor, scale, zeros, fmt: str, group: int) -> torch.Tensor:
    """(M, K) x @ dequant(W).T for many rows: W dequantized to 16 bit a slice of output rows at a
    time, each slice's product on cuBLAS."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    step = max(64, (CHUNK_ELEMENTS // k) // 64 * 64)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        torch.mm(x, dequantize(w, scale, zeros, fmt, group, x.dtype, (lo, hi)).t(), out=y[:, lo:hi])
    return y


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, eps, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    _wait_for_inputs(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    normed = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)  # the reference casts back, then scales
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    d = x.shape[-1]
    y = torch.empty_like(x)
    rows = x.numel() // d
    block = triton.next_power_of_2(d)
    launch(_rms_norm_kernel, (rows,))(x, weight, y, d, eps, BLOCK=block, num_warps=max(1, min(16, block // 512)))
    return y


@triton.jit
def _silu_mul_kernel(y_ptr, out_ptr, H, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    _wait_for_inputs(PDL)
    row, pid = tl.program_id(0), tl.program_id(1)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    ok = cols < H
    a = tl.load(y_ptr + row * 2 * H + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(y_ptr + row * 2 * H + H + cols, mask=ok, other=0.0).to(tl.float32)
    silu = (a / (1.0 + tl.exp(-a))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * H + cols, (silu * b).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(y: torch.Tensor) -> torch.Tensor:
    h = y.shape[-1] // 2
    rows = y.numel() // y.shape[-1]
    out = torch.empty((*y.shape[:-1], h), dtype=y.dtype, device=y.device)
    block = 1024
    launch(_silu_mul_kernel, (rows, triton.cdiv(h, block)))(y, out, h, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, rope_ptr, pos_ptr, rows_ptr, kv_ptr, qo_ptr, ko_ptr,
                       seqlen, pos_row_stride, q_bs, q_ts, k_bs, k_ts, v_bs, v_ts,
                       cache_b_stride, cache_s_stride, kv_half, H, HKV,
                       HAS_ROWS: tl.constexpr, HALF_D: tl.constexpr, PDL: tl.constexpr = False):
    """One program per (token, head): q heads 0..H-1 are rotated into qo; kv heads H..H+HKV-1
    have k rotated into ko and the cache, v copied into the cache."""
    _wait_for_inputs(PDL)
    tok, head = tl.program_id(0), tl.program_id(1)
    b = tok // seqlen
    t = tok % seqlen
    pos = tl.load(pos_ptr + b * pos_row_stride + t)
    i = tl.arange(0, HALF_D)
    cos = tl.load(rope_ptr + pos * HALF_D * 2 + 2 * i)
    sin = tl.load(rope_ptr + pos * HALF_D * 2 + 2 * i + 1)
    if head < H:
        base = q_ptr + b * q_bs + t * q_ts + head * HALF_D * 2
        x0 = tl.load(base + 2 * i).to(tl.float32)
        x1 = tl.load(base + 2 * i + 1).to(tl.float32)
        out = qo_ptr + (tok * H + head) * HALF_D * 2
        tl.store(out + 2 * i, (x0 * cos - x1 * sin).to(qo_ptr.dtype.element_ty))
        tl.store(out + 2 * i + 1, (x0 * sin + x1 * cos).to(qo_ptr.dtype.element_ty))
    else:
        h = head - H
        if HAS_ROWS:
            row = tl.load(rows_ptr + b).to(tl.int64)
        else:
            row = b.to(tl.int64)
        base = k_ptr + b * k_bs + t * k_ts + h * HALF_D * 2
        x0 = tl.load(base + 2 * i).to(tl.float32)
        x1 = tl.load(base + 2 * i + 1).to(tl.float32)
        r0 = (x0 * cos - x1 * sin).to(ko_ptr.dtype.element_ty)
        r1 = (x0 * sin + x1 * cos).to(ko_ptr.dtype.element_ty)
        out = ko_ptr + (tok * HKV + h) * HALF_D * 2
        tl.store(out + 2 * i, r0)
        tl.store(out + 2 * i + 1, r1)
        slot = kv_ptr + row * cache_b_stride + pos * cache_s_stride + h * HALF_D * 2
        tl.store(slot + 2 * i, r0)
        tl.store(slot + 2 * i + 1, r1)
        vbase = v_ptr + b * v_bs + t * v_ts + h * HALF_D * 2
        d = tl.arange(0, 2 * HALF_D)
        tl.store(slot + kv_half + d, tl.load(vbase + d))


def rope_and_store(xq, xk, xv, rope, positions, kv, rows):
    bs, seqlen, h, d = xq.shape
    hkv = xk.shape[2]
    if any(t.stride(3) != 1 or t.stride(2) != d for t in (xq, xk, xv)):  # heads must be contiguous
        xq, xk, xv = xq.contiguous(), xk.contiguous(), xv.contiguous()
    strides = [s for t in (xq, xk, xv) for s in (t.stride(0), t.stride(1))]  # (batch, token) of each
    qo = torch.empty((bs, seqlen, h, d), dtype=xq.dtype, device=xq.device)
    ko = torch.empty((bs, seqlen, hkv, d), dtype=xk.dtype, device=xk.device)
    positions = positions.contiguous()
    pos_row_stride = positions.stride(0) if positions.shape[0] > 1 else 0
    launch(_rope_store_kernel, (bs * seqlen, h + hkv))(
        xq, xk, xv, rope, positions, rows if rows is not None else positions, kv, qo, ko,
        seqlen, pos_row_stride, *strides, kv.stride(1), kv.stride(2), kv.stride(0), h, hkv,
        HAS_ROWS=rows is not None, HALF_D=d // 2, num_warps=1)
    return qo, ko


@triton.jit
def _decode_attn_kernel(q_ptr, kv_ptr, pos_ptr, rows_ptr, part_ptr, ml_ptr, pos_row_stride,
                        cache_b_stride, cache_s_stride, kv_half, scale, H, HKV, SPLITS, chunk,
                        HAS_ROWS: tl.constexpr, N_REP: tl.constexpr, BLOCK_H: tl.constexpr,
                        D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False):
    """Program (b, kv head, split): the split's cache positions up to the row's own, for the
    N_REP q heads sharing this kv head; writes unnormalised partial outputs and (max, sum)."""
    _wait_for_inputs(PDL)
    b, hk, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pos = tl.load(pos_ptr + b * pos_row_stride)
    if HAS_ROWS:
        row = tl.load(rows_ptr + b).to(tl.int64)
    else:
        row = b.to(tl.int64)
    hq = hk * N_REP + tl.arange(0, BLOCK_H)
    h_ok = tl.arange(0, BLOCK_H) < N_REP
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (b * H + hq)[:, None] * D + d[None, :], mask=h_ok[:, None], other=0.0)
    start = sp * chunk
    end = tl.minimum(start + chunk, pos + 1)
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, D), dtype=tl.float32)
    base = kv_ptr + row * cache_b_stride + hk * D
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < end
        k = tl.load(base + s[:, None] * cache_s_stride + d[None, :], mask=s_ok[:, None], other=0.0)
        v = tl.load(base + kv_half + s[:, None] * cache_s_stride + d[None, :], mask=s_ok[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale  # (BLOCK_H, BLOCK_S), log2 units
        scores = tl.where(s_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = ((b * H + hq) * SPLITS + sp)
    tl.store(part_ptr + out[:, None] * D + d[None, :], acc, mask=h_ok[:, None])
    tl.store(ml_ptr + out * 2, m, mask=h_ok)
    tl.store(ml_ptr + out * 2 + 1, l, mask=h_ok)


@triton.jit
def _combine_kernel(part_ptr, ml_ptr, o_ptr, SPLITS, BLOCK_SPLITS: tl.constexpr, D: tl.constexpr,
                    PDL: tl.constexpr = False):
    """Program (b * H + h): combines the splits' partial softmax sums."""
    _wait_for_inputs(PDL)
    bh = tl.program_id(0)
    sp = tl.arange(0, BLOCK_SPLITS)
    ok = sp < SPLITS
    m = tl.load(ml_ptr + (bh * SPLITS + sp) * 2, mask=ok, other=float("-inf"))
    l = tl.load(ml_ptr + (bh * SPLITS + sp) * 2 + 1, mask=ok, other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.where(ok & (m > float("-inf")), tl.exp2(m - m_all), 0.0)
    d = tl.arange(0, D)
    part = tl.load(part_ptr + (bh * SPLITS + sp)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(o_ptr + bh * D + d, out.to(o_ptr.dtype.element_ty))


def decode_attention(xq, kv, rows, positions) -> torch.Tensor:
    """q (bs, 1, H, head_dim) over each row's cache positions [0, positions[b]]."""
    bs, _, h, d = xq.shape
    hkv, max_len = kv.shape[3], kv.shape[2]
    n_rep = h // hkv
    cfg = tuning.attention_config(bs, hkv, max_len)
    splits, block_s = cfg["splits"], cfg["BLOCK_S"]
    chunk = triton.cdiv(triton.cdiv(max_len, splits), block_s) * block_s
    q = xq.contiguous()
    part = torch.empty((bs, h, splits, d), dtype=torch.float32, device=xq.device)
    ml = torch.empty((bs, h, splits, 2), dtype=torch.float32, device=xq.device)
    positions = positions.contiguous()
    scale = 1.4426950408889634 / d**0.5  # log2(e) / sqrt(head_dim): softmax in base 2
    launch(_decode_attn_kernel, (bs, hkv, splits))(
        q, kv, positions, rows if rows is not None else positions, part, ml,
        positions.stride(0) if positions.shape[0] > 1 else 0, kv.stride(1), kv.stride(2), kv.stride(0), scale,
        h, hkv, splits, chunk, HAS_ROWS=rows is not None, N_REP=n_rep, BLOCK_H=max(16, triton.next_power_of_2(n_rep)),
        D=d, BLOCK_S=block_s, num_warps=4)
    out = torch.empty((bs, 1, h, d), dtype=xq.dtype, device=xq.device)
    launch(_combine_kernel, (bs * h,))(part, ml, out, splits, BLOCK_SPLITS=triton.next_power_of_2(splits), D=d, num_warps=2)
    return out
