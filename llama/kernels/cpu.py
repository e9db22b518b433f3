"""Quantized products with many rows on the CPU: the weight dequantized a tile of output
rows at a time into one small reused buffer, each tile multiplied by torch's 16-bit (or
float32) matmul.

Why: torch's CPU products that read int8/int4 weights (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`) are fast for a row or a few (decode) but are not blocked
for many (measured at 64 rows: 1.7-3x the bf16 matmul's time, reading half its bytes or
less), and torch.compile's lowering of dequantize-then-matmul was slower still where it was
measured (one row; benchmarks/RESULTS.md). The matmul itself stays torch's; only the
dequantization of a tile is done here, with plain torch ops. A whole dequantized copy is
never held: the buffer is `TILE_ELEMENTS` (4 MB in bf16), whatever the layer's size.

int4 weights are read in `_convert_weight_to_int4pack_for_cpu`'s layout, the one the
decode product needs (so a layer keeps one copy of its weight): output rows in blocks of
64, a block's bytes (K, 32), byte [k, r] holding row r in its low nibble and row r + 32 in
its high one. Scales and zeros as that product takes them: (K // group, N, 2).
"""

from typing import Optional

import torch

TILE_ELEMENTS = 2 << 20  # dequantized weight elements per tile (a multiple of 64 rows)
_LOW = 0x0F0F0F0F  # the low nibble of each byte of an int32
_SIGN = -0x7F7F7F80  # 0x80808080 as an int32


def _tile_rows(k: int, n: int, multiple: int) -> int:
    rows = max(multiple, TILE_ELEMENTS // k // multiple * multiple)
    return min(rows, -(-n // multiple) * multiple)


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (q * scale[:, None]).T for int8 q (N, K) and scale (N,) in x's dtype:
    each tile of q converted to x's dtype exactly (|q| <= 127), the scales applied to the
    product's columns."""
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    rows = _tile_rows(k, n, 1)
    buf = torch.empty(rows, k, dtype=x.dtype)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        w = buf[: j - i]
        w.copy_(q[i:j])
        torch.mm(x, w.t(), out=y[:, i:j])
    return y.mul_(scale)


def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ W.T for the int4 W in the CPU packed layout (module docstring), where
    W[n, k] = (q - 8) * scale + zero of n's group holding k (N a multiple of 64)."""
    m, k = x.shape
    n = packed.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    rows = _tile_rows(k, n, 64)
    g = k // group
    halves = torch.empty(2, rows * k // 8, dtype=torch.int32)  # q - 8 of the low and high nibbles, a byte each
    w = torch.empty(k, rows, dtype=x.dtype)  # the tile, K-major
    for i in range(0, n, rows):
        j = min(i + rows, n)
        t, nb = j - i, (j - i) // 64
        src = packed[i:j].reshape(-1).view(torch.int32)  # 4 bytes of a block's (K, 32) a word
        lo, hi = halves[0, : src.numel()], halves[1, : src.numel()]
        # q - 8 as a signed byte, 4 at once: ((q | 0x80) - 8) ^ 0x80 never borrows across bytes
        torch.bitwise_and(src, _LOW, out=lo).add_(0x78787878).bitwise_xor_(_SIGN)
        torch.bitwise_right_shift(src, 4, out=hi).bitwise_and_(_LOW).add_(0x78787878).bitwise_xor_(_SIGN)
        tile = w[:, :t]
        by_block = tile.view(k, nb, 2, 32)  # column = block * 64 + (0: low nibble, 1: high) * 32 + r
        for half, nibbles in enumerate((lo, hi)):
            by_block[:, :, half].copy_(nibbles.view(torch.int8).view(nb, k, 32).transpose(0, 1))
        grouped = tile.view(g, group, t)
        s = scales_and_zeros[:, i:j, 0].contiguous()[:, None]  # (K // group, 1, t)
        z = scales_and_zeros[:, i:j, 1].contiguous()[:, None]
        torch.addcmul(z, grouped, s, out=grouped)
        torch.mm(x, tile, out=y[:, i:j])
    return y


def pack_like_torch(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K // 2) uint8 in the layout the module docstring describes
    (what `_convert_weight_to_int4pack_for_cpu` writes on x86 with AVX-512)."""
    n, k = q.shape
    blocks = q.to(torch.uint8).reshape(n // 64, 2, 32, k).transpose(2, 3)  # (nb, 2, K, 32)
    return (blocks[:, 0] | blocks[:, 1] << 4).reshape(n, k // 2)


_LAYOUT: Optional[str] = None


def int4pack_layout() -> str:
    """How this torch, on this CPU, packs int4 weights (the layout depends on the CPU's vector
    width), checked once on a small probe: 'known' (the one `int4pack_mm` reads), 'other', or
    'none' (no CPU int4 packing in this torch)."""
    global _LAYOUT
    if _LAYOUT is None:
        q = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        try:
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        except (RuntimeError, AttributeError, NotImplementedError):
            _LAYOUT = "none"
        else:
            _LAYOUT = "known" if packed.shape == (128, 32) and torch.equal(packed, pack_like_torch(q)) else "other"
    return _LAYOUT
