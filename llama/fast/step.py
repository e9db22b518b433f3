"""The fast path's step: static shapes, positions and cache rows as tensors."""

from dataclasses import dataclass
from typing import Optional

import torch

from llama import kernels
from llama.model import KVCache


@dataclass
class StepAt:
    """Token j of row i at position positions[i, j] of cache row rows[i] (rows None: row i);
    attends over cache positions [0, kv_len), each token seeing positions up to its own.
    Shapes depend only on (bs, seqlen, kv_len), so a decode step can be a CUDA graph (and
    on CUDA the decode attention reads the positions, so kv_len does not matter there).

    `prefill`: every row's tokens are positions 0 .. seqlen - 1 (causal among themselves).
    """

    rows: Optional[torch.Tensor]  # (bs,) or None
    positions: torch.Tensor  # (bs, seqlen) or (1, seqlen)
    kv_len: int
    rope: torch.Tensor  # the model's whole (positions, head_dim // 2, 2) table
    prefill: bool = False

    def attend(self, cache: KVCache, xq, xk, xv, n_rep: int) -> torch.Tensor:
        xq, xk = kernels.rope_and_store(xq, xk, xv, self.rope, self.positions, cache.kv, self.rows)
        if self.prefill:
            return kernels.causal_attention(xq, xk, xv, n_rep)
        return kernels.cache_attention(xq, cache.kv, self.rows, self.positions, self.kv_len, n_rep)
