"""Decoders: what `Llama.generate` calls to turn the next tokens into logits.

`FaithfulDecoder` is the reference's `model.forward(tokens, start_pos)`. `FastDecoder`
runs the same modules (transformed by `llama.fast.transform`) with a static-shape
`StepAt`; on CUDA every single-token step is a CUDA graph, replayed: one per batch-size
bucket (1, 2, 4, ... up to max_batch_size, smaller batches padded to their bucket), all
recorded by `prepare` before the first request, so no step of an answer waits for one.
`prepare` first runs each step once with its kernels compiling side by side instead of
running (`llama.kernels.ahead`), so that a first run on a machine compiles them at once.
"""

import time
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch

from llama import kernels
from llama.fast.step import StepAt
from llama.model import Transformer


class FaithfulDecoder:
    """The reference's forward pass; EOS is checked after every step."""

    sync_every = 1

    def __init__(self, model: Transformer):
        self.model = model

    def __call__(self, tokens: torch.Tensor, start_pos: int, all_logits: bool) -> torch.Tensor:
        return self.model.forward(tokens, start_pos)

    def setup_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        self.model.setup_cache(max_batch_size, max_seq_len)


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    tokens: torch.Tensor  # (bs, 1) static input
    positions: torch.Tensor  # (bs, 1) static input
    logits: torch.Tensor  # (bs, 1, vocab) static output


def kv_bucket(length: int, max_seq_len: int) -> int:
    """The cache length a step at `length` attends over where the kernel needs a fixed one:
    a power of two >= 256, at most max_seq_len."""
    bucket = 256
    while bucket < length:
        bucket *= 2
    return min(bucket, max_seq_len)


class FastDecoder:
    """Static-shape decoding on the model's own cache; one CUDA graph per batch size on CUDA."""

    def __init__(self, model: Transformer, cuda_graphs=None):
        self.model = model
        self.device = model.rope.device
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        self.sync_every = 16 if on_cuda else 1  # host syncs for the all-EOS check
        self.graphs: Dict[int, _Graph] = {}
        self._pool = None

    def buckets(self) -> list:
        """The batch sizes a graph is recorded for: powers of two up to max_batch_size, and it."""
        top = self.model.params.max_batch_size
        sizes = [1 << i for i in range(top.bit_length()) if 1 << i < top]
        return sizes + [top]

    def bucket(self, bs: int) -> int:
        return next(b for b in self.buckets() if b >= bs)

    @torch.inference_mode()
    def prepare(self) -> float:
        """Records every bucket's decode graph and runs a short prefill (so its kernels are
        ready); returns the seconds it took. Writes only cache positions 0..1, which a request
        overwrites before reading."""
        t0 = time.time()
        if self.cuda_graphs:
            with kernels.compiling_ahead():  # every kernel of the steps below, compiled side by side
                self._small_prefill()
                for bs in self.buckets():
                    if bs not in self.graphs:
                        self.step(*self._inputs(bs, 0), self.model.params.max_seq_len)
            self._small_prefill()
            for bs in self.buckets():
                if bs not in self.graphs:
                    self.graphs[bs] = self._capture(bs, start_pos=0)
            torch.cuda.synchronize(self.device)
        return time.time() - t0

    def _small_prefill(self) -> None:
        """A two-token prefill at cache positions 0..1 of row 0 (its kernels made ready)."""
        self.step(torch.zeros((1, 2), dtype=torch.long, device=self.device),
                  torch.arange(2, device=self.device)[None], 2, prefill=True)

    def _inputs(self, bs: int, start_pos: int):
        """Static decode inputs: tokens (bs, 1) of 0 and positions (bs, 1) of start_pos."""
        return (torch.zeros((bs, 1), dtype=torch.long, device=self.device),
                torch.full((bs, 1), start_pos, dtype=torch.long, device=self.device))

    def setup_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        """Reallocates the model's cache for other sizes; the recorded graphs point at the old one."""
        self.model.setup_cache(max_batch_size, max_seq_len)
        self.reset()
        self.prepare()

    def reset(self) -> None:
        """Forgets the recorded CUDA graphs (after the model's cache or weights were reallocated)."""
        self.graphs.clear()
        self._pool = None

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int, prefill: bool = False,
             last_only: bool = True, rows: Optional[torch.Tensor] = None,
             at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of `tokens` (bs, seqlen) at `positions` of cache rows `rows` (None: 0 .. bs - 1),
        as `StepAt` places them; of the last position only with `last_only`, of position at[i]
        of each row i only with `at` (bs,)."""
        return self.model.logits(tokens, StepAt(rows, positions, kv_len, self.model.rope, prefill), last_only, at)

    @torch.inference_mode()
    def step_rows(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One token for each of cache rows 0 .. bs - 1, each at its own position: tokens and
        positions (bs, 1), attending over [0, kv_len) (at least every position + 1); logits
        (bs, 1, vocab). With CUDA graphs, the bucket's graph is replayed: its rows past bs then
        write position 0 of their own cache rows, which must hold no request (and `prepare` must
        have recorded the graphs)."""
        if self.cuda_graphs:
            return self._replay(tokens, positions)
        return self.step(tokens, positions, kv_len)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, start_pos: int, all_logits: bool) -> torch.Tensor:
        bs, seqlen = tokens.shape
        if seqlen == 1 and self.cuda_graphs:
            return self._replay(tokens, start_pos)
        positions = torch.arange(start_pos, start_pos + seqlen, device=tokens.device)[None]
        max_seq_len = self.model.params.max_seq_len
        if start_pos == 0:
            kv_len = seqlen
        elif self.device.type == "cpu":  # attention reads [0, kv_len) there: the length itself (no graphs)
            kv_len = start_pos + seqlen
        else:
            kv_len = kv_bucket(start_pos + seqlen, max_seq_len)
        return self.step(tokens, positions, kv_len, prefill=start_pos == 0, last_only=not all_logits)

    def _replay(self, tokens: torch.Tensor, positions: Union[int, torch.Tensor]) -> torch.Tensor:
        """The step of `tokens` (bs, 1) at one position for all rows (an int) or at each row's
        own (a (bs, 1) tensor), replayed in the graph of bs's bucket."""
        bs = tokens.shape[0]
        size = self.bucket(bs)
        g = self.graphs.get(size)
        if g is None:
            if not isinstance(positions, int):  # a capture would write over the rows' positions
                raise RuntimeError(f"no CUDA graph recorded for batch size {size}: call prepare() first")
            g = self.graphs[size] = self._capture(size, positions)
        g.tokens[:bs].copy_(tokens)
        if isinstance(positions, int):
            g.positions.fill_(positions)
        else:
            g.positions[:bs].copy_(positions)
            g.positions[bs:].zero_()
        g.graph.replay()
        return g.logits[:bs]

    def _capture(self, bs: int, start_pos: int) -> _Graph:
        """Records a decode step at batch size `bs`. Warm-up runs write only cache position
        `start_pos` of rows 0..bs-1, which the real step overwrites before anything reads it."""
        tokens, positions = self._inputs(bs, start_pos)
        kv_len = self.model.params.max_seq_len
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(tokens, positions, kv_len)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.step(tokens, positions, kv_len)
        self._pool = graph.pool()
        return _Graph(graph, tokens, positions, logits)
