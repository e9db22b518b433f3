"""The Llama 2 Transformer, as Meta's reference defines it.

Plain PyTorch, one process's view of the model, defined here only. Model parallelism
(`llama.parallel`), quantization (`llama.quant`) and the fast decode path (`llama.fast`)
are transforms of this model that reuse its parameters.

Where a forward pass's tokens sit in the sequence is a `Step`: it applies RoPE at those
positions, writes keys and values into the layer's `KVCache`, and attends. `forward(tokens,
start_pos)` is the reference's step (slices of the cache up to start_pos + seqlen);
the fast path (`llama.fast.step`) brings a static-shape step (cache rows and positions
as tensors, a fixed attended length) and runs the same modules with it.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from llama.config import ModelArgs

__all__ = ["ModelArgs", "Transformer", "TransformerBlock", "Attention", "FeedForward", "RMSNorm", "KVCache",
           "precompute_freqs_cis", "apply_rotary_emb", "repeat_kv"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotary embedding table: (end, dim // 2) complex64 unit vectors."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)


def rope_table(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """The same table as real numbers: (end, dim // 2, 2) cos and sin."""
    return torch.view_as_real(precompute_freqs_cis(dim, end, theta)).contiguous()


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotates (real, imag) pairs of adjacent dims of x (bs, seqlen, heads, head_dim) by the
    angles in `rope` (bs or 1, seqlen, head_dim // 2, 2), in float32, as the reference does."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (bs, seqlen, heads, head_dim // 2, 2)
    cos, sin = rope[..., 0].unsqueeze(2), rope[..., 1].unsqueeze(2)  # (bs, seqlen, 1, head_dim // 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(3).type_as(x)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference's signature: rotates q and k by a (seqlen, head_dim // 2) complex table."""
    rope = torch.view_as_real(freqs_cis)[None]  # (1, seqlen, head_dim // 2, 2)
    return apply_rope(xq, rope), apply_rope(xk, rope)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(bs, seqlen, n_kv_heads, head_dim) -> (bs, seqlen, n_kv_heads * n_rep, head_dim)."""
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (
        x[:, :, :, None, :]
        .expand(bs, slen, n_kv_heads, n_rep, head_dim)
        .reshape(bs, slen, n_kv_heads * n_rep, head_dim)
    )


class KVCache(nn.Module):
    """One layer's keys and values: `kv` (2, max_batch_size, max_seq_len, kv_heads, head_dim),
    keys in kv[0], values in kv[1] (one tensor, so one kernel writes both)."""

    def __init__(self, max_batch_size: int, max_seq_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        shape = (2, max_batch_size, max_seq_len, kv_heads, head_dim)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_batch_size(self) -> int:
        return self.kv.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.kv.shape[2]


def add_projection(linear: nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
    """residual + linear(x) (the fast path's layers add it in the same kernel, `fuses_residual`)."""
    if residual is not None and getattr(linear, "fuses_residual", False):
        return linear(x, residual=residual)
    y = linear(x)
    return y if residual is None else residual + y


def reference_attention(xq, keys, values, mask, n_rep: int) -> torch.Tensor:
    """The reference's attention: (bs, seqlen, heads, head_dim) q over (bs, len, kv_heads,
    head_dim) keys and values, with an additive mask; returns (bs, seqlen, heads, head_dim)."""
    keys, values = repeat_kv(keys, n_rep), repeat_kv(values, n_rep)
    xq = xq.transpose(1, 2)  # (bs, n_local_heads, seqlen, head_dim)
    keys = keys.transpose(1, 2)  # (bs, n_local_heads, cache_len, head_dim)
    values = values.transpose(1, 2)
    scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(xq.shape[-1])
    if mask is not None:
        scores = scores + mask  # (bs, n_local_heads, seqlen, cache_len)
    scores = F.softmax(scores.float(), dim=-1).type_as(xq)
    return torch.matmul(scores, values).transpose(1, 2)  # (bs, seqlen, n_local_heads, head_dim)


@dataclass
class Step:
    """The reference's step: tokens at positions start_pos .. start_pos + seqlen - 1 of cache
    rows 0 .. bs - 1; attention over the cache up to there, causal among the new tokens."""

    start_pos: int
    rope: torch.Tensor  # (1, seqlen, head_dim // 2, 2)
    mask: Optional[torch.Tensor]  # (seqlen, start_pos + seqlen) additive, or None for one token
    use_cache: bool = True  # False: attend over the new tokens only, the cache untouched

    def attend(self, cache: Optional[KVCache], xq, xk, xv, n_rep: int) -> torch.Tensor:
        xq, xk = apply_rope(xq, self.rope), apply_rope(xk, self.rope)
        if cache is None or not self.use_cache:
            return reference_attention(xq, xk, xv, self.mask, n_rep)
        bsz, seqlen = xq.shape[:2]
        end = self.start_pos + seqlen
        cache.kv[0, :bsz, self.start_pos : end] = xk
        cache.kv[1, :bsz, self.start_pos : end] = xv
        return reference_attention(xq, cache.kv[0, :bsz, :end], cache.kv[1, :bsz, :end], self.mask, n_rep)


class Attention(nn.Module):
    """Grouped-query attention.

    `n_local_heads` / `n_local_kv_heads` are the heads this process holds; they equal the
    model's head counts unless `llama.parallel` splits the model. The fast path replaces
    wq, wk, wv by one projection, `wqkv`.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_local_heads = args.n_heads
        self.n_local_kv_heads = args.kv_heads
        self.n_rep = args.n_heads // args.kv_heads
        self.head_dim = args.head_dim

        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.wqkv: Optional[nn.Module] = None
        self.cache: Optional[KVCache] = None

    def qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections of x: (bs, seqlen, heads, head_dim) each."""
        bsz, seqlen, _ = x.shape
        q_size, kv_size = self.n_local_heads * self.head_dim, self.n_local_kv_heads * self.head_dim
        if self.wqkv is not None:
            xq, xk, xv = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        else:
            xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        return (xq.view(bsz, seqlen, self.n_local_heads, self.head_dim),
                xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim),
                xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim))

    def forward(self, x: torch.Tensor, step, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention output (+ `residual`, when given)."""
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.qkv(x)
        output = step.attend(self.cache, xq, xk, xv, self.n_rep)
        return add_projection(self.wo, output.reshape(bsz, seqlen, -1), residual)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1(x)) * w3(x)). The fast path replaces w1 and w3 by one gated
    projection, `w13`, that computes silu(w1(x)) * w3(x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w13: Optional[nn.Module] = None

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The feed-forward output (+ `residual`, when given)."""
        hidden = self.w13(x) if self.w13 is not None else F.silu(self.w1(x)) * self.w3(x)
        return add_projection(self.w2, hidden, residual)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, step) -> torch.Tensor:
        h = self.attention(self.attention_norm(x), step, residual=x)  # x + attention
        return self.feed_forward(self.ffn_norm(h), residual=h)  # h + feed-forward


class Transformer(nn.Module):
    """Maps tokens to float32 logits, filling its KV cache from `start_pos` on.

    Built on the meta device (as `llama.build` does) it holds no cache until `setup_cache`;
    otherwise it has one for params.max_batch_size x params.max_seq_len, as the reference's.
    """

    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers

        if torch.empty(0).device.type == "meta":  # (random init on meta costs torch a one-time 1.5 s import)
            self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim,
                                               _weight=torch.empty(params.vocab_size, params.dim))
        else:
            self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        self.register_buffer("rope", None, persistent=False)
        if self.tok_embeddings.weight.device.type != "meta":
            self.setup_cache(params.max_batch_size, params.max_seq_len)

    def setup_cache(self, max_batch_size: int, max_seq_len: int, device=None, dtype=None) -> None:
        """Allocates every layer's KV cache, zeroed, for max_batch_size x max_seq_len tokens, and
        the RoPE table for 2 * max_seq_len positions (as the reference's), on `device` in `dtype`
        (default: the embedding's)."""
        weight = self.tok_embeddings.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        p = self.params
        self.params.max_batch_size, self.params.max_seq_len = max_batch_size, max_seq_len
        self.rope = rope_table(p.head_dim, max_seq_len * 2, p.rope_theta).to(device)
        for layer in self.layers:
            attn = layer.attention
            layer.attention.cache = KVCache(max_batch_size, max_seq_len, attn.n_local_kv_heads, attn.head_dim,
                                            dtype, device)

    def logits(self, tokens: torch.Tensor, step, last_only: bool = False,
               at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Float32 logits (bs, seqlen, vocab) of `tokens` (bs, seqlen) placed by `step`; with
        `last_only`, of the last position only (bs, 1, vocab); with `at` (bs,), of position
        at[i] of row i only (bs, 1, vocab)."""
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, step)
        if at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), at][:, None]
        elif last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Logits (bs, seqlen, vocab) of tokens at positions start_pos .., cached for later steps."""
        seqlen = tokens.shape[1]
        mask = None
        if seqlen > 1:
            mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device)
            mask = torch.triu(mask, diagonal=1)
            # (seqlen, start_pos + seqlen): cached positions are all visible
            mask = torch.hstack([torch.zeros((seqlen, start_pos), device=tokens.device), mask])
            mask = mask.to(self.tok_embeddings.weight.dtype)
        return self.logits(tokens, Step(start_pos, self.rope[None, start_pos : start_pos + seqlen], mask))

    def score(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (bs, seqlen, vocab) of whole sequences from position 0, leaving the cache alone
        (differentiable: for training and perplexity)."""
        seqlen = tokens.shape[1]
        rope = rope_table(self.params.head_dim, seqlen, self.params.rope_theta).to(tokens.device)[None]
        mask = torch.triu(torch.full((seqlen, seqlen), float("-inf"), device=tokens.device), diagonal=1)
        return self.logits(tokens, Step(0, rope, mask.to(self.tok_embeddings.weight.dtype), use_cache=False))
