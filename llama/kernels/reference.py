"""Pure-torch definitions of every kernel in `llama.kernels`: what runs where no kernel
applies (the CPU, other shapes), and what the kernels are tested against."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from llama.model import apply_rope


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the reference computes it: normalized in float32, cast back, times weight."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def silu_mul(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of y = [gate | up] (..., 2 * hidden) -> (..., hidden)."""
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_and_store(xq, xk, xv, rope, positions, kv, rows: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k (bs, seqlen, heads, head_dim) at `positions` (bs or 1, seqlen) of the
    (positions, head_dim // 2, 2) table; writes k and v into cache `kv` (2, B, S, kv_heads,
    head_dim) at rows `rows` (bs,) (None: 0 .. bs - 1) and those positions. Returns q, k rotated."""
    r = rope[positions]  # (bs or 1, seqlen, head_dim // 2, 2)
    xq, xk = apply_rope(xq, r), apply_rope(xk, r)
    bs = xq.shape[0]
    row_index = (torch.arange(bs, device=xq.device) if rows is None else rows)[:, None]
    kv[:, row_index, positions] = torch.stack([xk, xv]).to(kv.dtype)
    return xq, xk


def causal_attention(xq, xk, xv, n_rep: int) -> torch.Tensor:
    """Causal attention among the new tokens (a prefill from position 0); (bs, seqlen, heads, head_dim)."""
    q, k, v = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)  # (bs, heads, seqlen, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_rep > 1)
    return out.transpose(1, 2)


def cache_attention(xq, kv, rows: Optional[torch.Tensor], positions, kv_len: int, n_rep: int) -> torch.Tensor:
    """Attention of q (bs, seqlen, heads, head_dim) at `positions` over cache positions
    [0, kv_len) of cache rows `rows`, each token seeing the positions up to its own."""
    bs = xq.shape[0]
    if rows is None:
        keys, values = kv[0, :bs, :kv_len], kv[1, :bs, :kv_len]  # (bs, kv_len, kv_heads, head_dim)
    else:
        keys, values = kv[0, rows, :kv_len], kv[1, rows, :kv_len]
    # (bs or 1, 1, seqlen, kv_len): position j visible to the token at positions[i] iff j <= positions[i]
    visible = torch.arange(kv_len, device=xq.device)[None, None, :] <= positions[:, :, None]
    out = F.scaled_dot_product_attention(xq.transpose(1, 2), keys.transpose(1, 2).to(xq.dtype),
                                         values.transpose(1, 2).to(xq.dtype), attn_mask=visible[:, None],
                                         enable_gqa=n_rep > 1)
    return out.transpose(1, 2)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 and (N,) scales -> float32 (N, K)."""
    return q.float() * scale.float()[:, None]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 values 0..15 (the even column in the high nibble)."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Packed (N, K // 2) and (N, K // group) scales and zeros -> float32 (N, K): (q - 8) * scale + zero."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    group = k // scales.shape[1]
    w = (q.reshape(n, -1, group) - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(n, k)
