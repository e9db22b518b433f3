"""Decoders: what `Llama.generate` calls to turn the next tokens into logits.

`FaithfulDecoder` is the reference's `model.forward(tokens, start_pos)`.
`FastDecoder` runs `FastForward` and, on CUDA, replays one CUDA graph per
(batch size, KV length bucket) for single-token decode steps, with the per-block
step compiled by torch.compile.
"""

import sys
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from llama.distributed import is_rank_zero
from llama.fast.forward import FastForward, join_kv_caches, rope_tables
from llama.model import Transformer


class FaithfulDecoder:
    """The reference's forward pass; EOS is checked after every step."""

    sync_every = 1

    def __init__(self, model: Transformer):
        self.model = model

    def __call__(self, tokens: torch.Tensor, start_pos: int, all_logits: bool) -> torch.Tensor:
        return self.model.forward(tokens, start_pos)


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    tokens: torch.Tensor  # (bs, 1) static input
    pos: torch.Tensor  # (1,) static input
    logits: torch.Tensor  # (bs, 1, vocab) static output


# torch.compile arguments of each `compile` setting. "tuned": inductor's coordinate-descent
# tuning of its kernels (at batch 1 the products are llama.gemv's, so it measured no gain there).
COMPILE_MODES = {
    True: {},
    "default": {},
    "tuned": {"options": {"coordinate_descent_tuning": True}},
    "max-autotune": {"mode": "max-autotune-no-cudagraphs"},
}


def _compiler(mode):
    """torch.compile for the block step; one compiled function serves every block."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be True, False, 'tuned' or 'max-autotune', got {mode!r}")
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # one compile per layer shape, not per layer
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    return lambda fn: torch.compile(fn, fullgraph=True, **COMPILE_MODES[mode])


class FastDecoder:
    """Static-shape decoding on the model's own cache; CUDA graphs and compilation on GPU."""

    def __init__(self, model: Transformer, compile=None, cuda_graphs: Optional[bool] = None,
                 small_mm: Optional[bool] = None):
        """compile: True, False, 'tuned' or 'max-autotune' (longer warm-ups); default True on CUDA.
        small_mm: False keeps batch-1 products on cuBLAS instead of `llama.gemv`'s kernel."""
        self.device = model.output.weight.device
        on_cuda = self.device.type == "cuda"
        self.compile = on_cuda if compile is None else compile
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        self.forward = FastForward(model, _compiler(self.compile) if self.compile else None, small_mm)
        self.model = model
        self.max_seq_len = model.params.max_seq_len
        self.sync_every = 16 if on_cuda else 1  # host syncs for the all-EOS check
        self.graphs: Dict[Tuple[int, int], _Graph] = {}
        self._pool = None

    def kv_bucket(self, length: int) -> int:
        """Cache length a step at `length` attends over: a power of two >= 256, at most max_seq_len."""
        bucket = 256
        while bucket < length:
            bucket *= 2
        return min(bucket, self.max_seq_len)

    def _check_caches(self) -> None:
        """Graphs point at the cache and RoPE memory: if the model's buffers were reallocated
        (`Transformer.reset_buffers`, e.g. for a new max_seq_len), start over."""
        attn = self.model.layers[0].attention
        if attn.cache_k.data_ptr() != attn.cache_kv[0].data_ptr():
            join_kv_caches(self.model)
            self.forward.cos, self.forward.sin = rope_tables(self.model)
            self.max_seq_len = self.model.params.max_seq_len
            self.graphs.clear()

    def __call__(self, tokens: torch.Tensor, start_pos: int, all_logits: bool) -> torch.Tensor:
        bs, seqlen = tokens.shape
        if start_pos == 0:
            self._check_caches()
        if seqlen == 1 and self.cuda_graphs:
            return self._replay(tokens, start_pos)
        pos = torch.arange(start_pos, start_pos + seqlen, device=tokens.device)
        if start_pos == 0:
            return self.forward(tokens, pos, seqlen, causal_from_zero=True, last_only=not all_logits)
        kv_len = self.kv_bucket(start_pos + seqlen)
        return self.forward(tokens, pos, kv_len, causal_from_zero=False, last_only=not all_logits)

    def _replay(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        key = (tokens.shape[0], self.kv_bucket(start_pos + 1))
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(*key, start_pos)
        g.tokens.copy_(tokens)
        g.pos.fill_(start_pos)
        g.graph.replay()
        return g.logits

    def _capture(self, bs: int, kv_len: int, start_pos: int) -> _Graph:
        """Records a decode step. Warm-up runs write only cache position `start_pos`, which the
        real step overwrites before anything reads it."""
        tokens = torch.zeros((bs, 1), dtype=torch.long, device=self.device)
        pos = torch.full((1,), start_pos, dtype=torch.long, device=self.device)
        first = not self.graphs
        t0 = time.time()
        if first and self.compile and is_rank_zero():
            print("compiling the decode step...", end=" ", flush=True, file=sys.stderr)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(tokens, pos, kv_len, causal_from_zero=False, last_only=True)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.forward(tokens, pos, kv_len, causal_from_zero=False, last_only=True)
        self._pool = graph.pool()
        torch.cuda.synchronize(self.device)
        if first and self.compile and is_rank_zero():
            print(f"done in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
        return _Graph(graph, tokens, pos, logits)

    def warmup(self, batch_sizes=(1,)) -> float:
        """Compiles prefill (for any length) and captures decode steps ahead of the first
        request; returns seconds spent."""
        if not self.cuda_graphs:
            return 0.0
        t0 = time.time()
        for length in (16, 17):  # a second length makes the compiled prefill length-generic
            tokens = torch.zeros((1, length), dtype=torch.long, device=self.device)
            self(tokens, 0, False)
        for bs in batch_sizes:
            key = (bs, self.kv_bucket(1))
            if key not in self.graphs:
                self.graphs[key] = self._capture(bs, key[1], start_pos=0)
        return time.time() - t0
