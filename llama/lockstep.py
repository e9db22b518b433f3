"""The serving engine's forward passes, run alike on every rank.

Rank 0 decides each step (`prefill` one request into its cache row, or `decode` one token
for a set of rows) and, with several processes, first broadcasts the step's inputs; the
other ranks wait in `follow` and run the same forward, so every all-reduce of the model
parallel layers meets its peers. Only rank 0 reads the logits.
"""

from typing import List

import torch
import torch.distributed as dist

from llama.fast import FastDecoder
from llama.model import Transformer

STOP, PREFILL, DECODE = 0, 1, 2


class Lockstep:
    """Prefill and decode steps on the model's own cache, mirrored on every rank.

    Args:
        model: the loaded model (faithful or transformed for the fast path).
        decoder: the Llama's decoder; a `FastDecoder` brings its CUDA graphs, anything else
            is replaced by a graph-less `FastDecoder` over the same modules.
    """

    def __init__(self, model: Transformer, decoder=None):
        self.model = model
        self.decoder = decoder if isinstance(decoder, FastDecoder) else FastDecoder(model, cuda_graphs=False)
        self.device = model.rope.device
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        nccl = self.world_size > 1 and dist.get_backend() == "nccl"
        self.wire = self.device if nccl else torch.device("cpu")  # where broadcast tensors live

    def prepare(self) -> None:
        """Records the decode graphs where they are used (before any request holds a row)."""
        if self.decoder.cuda_graphs:
            self.decoder.prepare()

    def prefill(self, row: int, tokens: List[int], all_logits: bool) -> torch.Tensor:
        """Logits (n, vocab), or (1, vocab) of the last position, of `tokens` placed at
        positions 0 .. n - 1 of cache row `row`."""
        t = torch.tensor(tokens, dtype=torch.long)
        self._send(PREFILL, row, int(all_logits), t)
        return self._prefill(row, int(all_logits), t.to(self.device))

    def decode(self, tokens: List[int], positions: List[int]) -> torch.Tensor:
        """Logits (bs, vocab) of tokens[i] at positions[i] of cache row i, for rows 0 .. bs - 1."""
        t = torch.tensor(tokens + positions, dtype=torch.long)
        kv_len = max(positions) + 1
        self._send(DECODE, len(tokens), kv_len, t)
        return self._decode(len(tokens), kv_len, t.to(self.device))

    def close(self) -> None:
        """Tells the other ranks to leave `follow`."""
        self._send(STOP, 0, 0, None)

    def follow(self) -> None:
        """On ranks other than 0: prepares as rank 0's engine does, then runs every step rank 0
        broadcasts, until it closes."""
        self.prepare()
        while True:
            header = torch.zeros(4, dtype=torch.long, device=self.wire)
            dist.broadcast(header, src=0)
            kind, a, b, n = header.tolist()
            if kind == STOP:
                return
            payload = torch.zeros(n, dtype=torch.long, device=self.wire)
            dist.broadcast(payload, src=0)
            (self._prefill if kind == PREFILL else self._decode)(a, b, payload.to(self.device))

    def _send(self, kind: int, a: int, b: int, payload) -> None:
        if self.world_size == 1:
            return
        n = 0 if payload is None else payload.numel()
        dist.broadcast(torch.tensor([kind, a, b, n], dtype=torch.long, device=self.wire), src=0)
        if n:
            dist.broadcast(payload.to(self.wire), src=0)

    @torch.inference_mode()
    def _prefill(self, row: int, all_logits: int, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.numel()
        positions = torch.arange(n, device=self.device)[None]  # (1, n)
        rows = torch.tensor([row], dtype=torch.long, device=self.device)
        return self.decoder.step(tokens[None], positions, n, prefill=True, last_only=not all_logits, rows=rows)[0]

    @torch.inference_mode()
    def _decode(self, bs: int, kv_len: int, payload: torch.Tensor) -> torch.Tensor:
        tokens, positions = payload[:bs, None], payload[bs:, None]  # (bs, 1) each
        return self.decoder.step_rows(tokens, positions, kv_len)[:, 0]
