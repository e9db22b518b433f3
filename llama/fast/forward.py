"""The fast forward pass: the same model and weights, computed for speed.

Differences from `Transformer.forward`, none of which change the function computed:
- wq/wk/wv and w1/w3 are fused into one matrix each (`fuse_projections`); the
  original weights become views of the fused ones, so memory does not grow and
  the faithful forward keeps working;
- RoPE with real cos/sin tables (complex numbers do not compile);
- the KV cache is the model's own (its k and v halves joined into one tensor, so one
  kernel writes both), written at a position tensor and read up to a fixed length, so
  shapes are static and a decode step can be a CUDA graph;
- attention through `scaled_dot_product_attention` (flash kernels on GPU);
- on CUDA, single-row products (batch-1 decode steps) use `llama.gemv`'s kernel;
- one function computes a whole block (`layer_step`), so that compilation can fuse across
  attention; each block's feed-forward output is added to the residual stream by the next
  block (or the final norm), fused with that block's first norm.
"""

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs
from torch import nn

from llama import gemv, parallel, quant
from llama.model import Transformer, TransformerBlock

_HAS_GQA_SDPA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def fuse_projections(model: Transformer) -> None:
    """Gives each layer `attention.wqkv` and `feed_forward.w13`; the old weights become views of
    them (quantized layers: slices of the joined layer's output)."""
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        if hasattr(attn, "wqkv"):
            continue
        if isinstance(attn.wq, quant.QuantLinear):
            attn.wqkv = _join_quantized(attn, ("wq", "wk", "wv"))
            ffn.w13 = _join_quantized(ffn, ("w1", "w3"))
            continue
        attn.wqkv = _fuse([attn.wq, attn.wk, attn.wv])
        ffn.w13 = _fuse([ffn.w1, ffn.w3])


def _join_quantized(module, names) -> quant.QuantLinear:
    parts = [getattr(module, name) for name in names]
    joined = quant.QuantLinear.cat(parts)  # before quant.prepare(model)
    start = 0
    for name, part in zip(names, parts):
        setattr(module, name, quant.QuantSlice(joined, start, start + part.out_features))
        start += part.out_features
    return joined


def _linear(x: torch.Tensor, w, small_mm: bool) -> torch.Tensor:
    """x @ w.T for a weight tensor (through `llama.gemv` where it applies, if `small_mm`), or a
    quantized layer's output."""
    if not isinstance(w, torch.Tensor):
        return w(x)
    return gemv.linear(x, w) if small_mm else F.linear(x, w)


def _project(layer: nn.Module, x: torch.Tensor, small_mm: bool) -> torch.Tensor:
    """layer(x) for the model's linear layers: nn.Linear, fairscale's parallel layers (with the
    same collectives) or quantized layers."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return _linear(t, layer.weight, small_mm)

    if isinstance(layer, fs.ColumnParallelLinear):
        return parallel.column_parallel(local, x, layer.gather_output)
    if isinstance(layer, fs.RowParallelLinear):
        return parallel.row_parallel(local, x)
    if isinstance(layer, nn.Linear) and layer.bias is None:
        return local(x)
    return layer(x)


def _fuse(linears) -> torch.Tensor:
    fused = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = torch.nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return fused


def join_kv_caches(model: Transformer) -> None:
    """Makes each layer's cache_k and cache_v the two halves of one `cache_kv` tensor
    (2, max_batch_size, max_seq_len, kv_heads, head_dim), unless they already are."""
    for layer in model.layers:
        attn = layer.attention
        kv = getattr(attn, "cache_kv", None)
        if kv is not None and attn.cache_k.data_ptr() == kv[0].data_ptr() and attn.cache_v.data_ptr() == kv[1].data_ptr():
            continue
        kv = torch.stack([attn.cache_k, attn.cache_v])
        attn.cache_kv, attn.cache_k, attn.cache_v = kv, kv[0], kv[1]


def rope_tables(model: Transformer) -> Tuple[torch.Tensor, torch.Tensor]:
    """(positions, head_dim // 2) float32 cos and sin of the model's RoPE angles."""
    return model.freqs_cis.real.contiguous(), model.freqs_cis.imag.contiguous()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (bs, seqlen, heads, head_dim) rotated by (seqlen, head_dim // 2) tables, as in apply_rotary_emb."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)  # (bs, seqlen, heads, head_dim // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(3).type_as(x)


def attention_inputs(
    layer: TransformerBlock, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, small_mm: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Norm, fused q/k/v projection and RoPE: q (bs, seqlen, heads, head_dim) and
    k, v stacked (2, bs, seqlen, kv_heads, head_dim)."""
    attn = layer.attention
    bs, seqlen, _ = h.shape
    x = layer.attention_norm(h)
    q_size = attn.n_local_heads * attn.head_dim
    kv_size = attn.n_local_kv_heads * attn.head_dim
    xq, xk, xv = _linear(x, attn.wqkv, small_mm).split([q_size, kv_size, kv_size], dim=-1)
    xq = apply_rope(xq.view(bs, seqlen, attn.n_local_heads, attn.head_dim), cos, sin)
    xk = apply_rope(xk.view(bs, seqlen, attn.n_local_kv_heads, attn.head_dim), cos, sin)
    return xq, torch.stack([xk, xv.view(bs, seqlen, attn.n_local_kv_heads, attn.head_dim)])


def feed_forward(layer: TransformerBlock, h: torch.Tensor, small_mm: bool) -> torch.Tensor:
    """The SwiGLU feed-forward of the normed residual stream (without the residual)."""
    ffn = layer.feed_forward
    gate, up = _linear(layer.ffn_norm(h), ffn.w13, small_mm).chunk(2, dim=-1)
    return _project(ffn.w2, F.silu(gate) * up, small_mm)


def attend(
    layer: TransformerBlock,
    xq: torch.Tensor,
    kv: torch.Tensor,
    slots: Tuple[torch.Tensor, torch.Tensor],
    kv_len: int,
    mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """Writes k/v into the cache at `slots` (`cache_slots`), attends over cache positions
    [0, kv_len).

    mask None means causal from position 0 (a prefill); else an additive (1, 1, seqlen, kv_len)
    mask. Returns (bs, heads, seqlen, head_dim).
    """
    attn = layer.attention
    bs = xq.shape[0]
    attn.cache_kv[:, slots[0], slots[1]] = kv
    keys = attn.cache_kv[0, :bs, :kv_len].transpose(1, 2)  # (bs, kv_heads, kv_len, head_dim)
    values = attn.cache_kv[1, :bs, :kv_len].transpose(1, 2)
    q = xq.transpose(1, 2)  # (bs, heads, seqlen, head_dim)
    if not _HAS_GQA_SDPA and attn.n_rep > 1:
        keys = keys.repeat_interleave(attn.n_rep, dim=1)
        values = values.repeat_interleave(attn.n_rep, dim=1)
    kwargs = {"enable_gqa": attn.n_rep > 1} if _HAS_GQA_SDPA else {}
    if mask is None:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, **kwargs)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, **kwargs)


def cache_slots(bs: int, input_pos: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(batch rows (bs, 1), positions (1, seqlen)): the index of a step's k/v in the whole cache.

    The cache is indexed whole, not through a batch slice of it: compiled, a write through a
    slice copies the slice (all max_seq_len positions of bs rows) and back, in every block.
    """
    return torch.arange(bs, device=input_pos.device)[:, None], input_pos[None, :]


def layer_step(
    layer: TransformerBlock,
    h: torch.Tensor,
    ffn_out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: Tuple[torch.Tensor, torch.Tensor],
    kv_len: int,
    mask: Optional[torch.Tensor],
    small_mm: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One transformer block. Its input is h + ffn_out (the previous block's residual stream and
    feed-forward output); returns this block's (h, ffn_out), so that each sum is computed
    where the next norm reads it."""
    h = h + ffn_out
    xq, kv = attention_inputs(layer, h, cos, sin, small_mm)
    out = attend(layer, xq, kv, slots, kv_len, mask)
    bs, seqlen = h.shape[:2]
    h = h + _project(layer.attention.wo, out.transpose(1, 2).reshape(bs, seqlen, -1), small_mm)
    return h, feed_forward(layer, h, small_mm)


def final_logits(model: Transformer, h: torch.Tensor, ffn_out: torch.Tensor, small_mm: bool) -> torch.Tensor:
    """Float32 logits of the last block's output h + ffn_out."""
    return _project(model.output, model.norm(h + ffn_out), small_mm).float()


class FastForward:
    """tokens (bs, seqlen) at positions `input_pos` -> float32 logits, on the model's own cache.

    `compile_fn` (e.g. torch.compile) is applied to `layer_step`, one compiled function for
    every block, and to the final norm and output. Single-row products (batch-1 decode
    steps) go through `llama.gemv` where it is available (CUDA with Triton), unless
    `small_mm` is False.
    """

    def __init__(self, model: Transformer, compile_fn: Optional[Callable] = None, small_mm: Optional[bool] = None):
        fuse_projections(model)
        join_kv_caches(model)
        self.model = model
        self.cos, self.sin = rope_tables(model)
        self.small_mm = gemv.available() and small_mm is not False
        wrap = compile_fn or (lambda f: f)
        self.layer_step = wrap(layer_step)
        self.final = wrap(final_logits)

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int,
                 causal_from_zero: bool, last_only: bool) -> torch.Tensor:
        """Logits (bs, seqlen, vocab), or (bs, 1, vocab) for the last position when `last_only`.

        causal_from_zero: the tokens are positions 0..seqlen-1 (a prefill); otherwise each
        token sees the cache up to its own position.
        """
        model = self.model
        h = model.tok_embeddings(tokens)
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        mask = None
        if not causal_from_zero:
            # (1, 1, seqlen, kv_len): position j visible to the token at input_pos[i] iff j <= input_pos[i]
            visible = torch.arange(kv_len, device=tokens.device)[None, :] <= input_pos[:, None]
            mask = torch.zeros(visible.shape, dtype=h.dtype, device=h.device).masked_fill_(~visible, float("-inf"))
            mask = mask[None, None]
        slots = cache_slots(tokens.shape[0], input_pos)
        ffn_out = torch.zeros_like(h)
        for layer in model.layers:
            h, ffn_out = self.layer_step(layer, h, ffn_out, cos, sin, slots, kv_len, mask, self.small_mm)
        if last_only:
            h, ffn_out = h[:, -1:], ffn_out[:, -1:]
        return self.final(model, h, ffn_out, self.small_mm)
