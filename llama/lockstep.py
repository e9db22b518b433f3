"""The serving engine's forward passes, run alike on every rank.

Rank 0 decides each step (`prefill` requests into their cache rows, or `decode` one token
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


class Uploads:
    """Small lists of ints (indices, positions, step headers) to a device, without waiting for
    it: a plain copy to CUDA waits for all the work queued before it (the step just
    launched); these go from pinned memory, asynchronously.

    The pinned memory is one block, allocated once, used as a ring in two halves: pinning
    a new block for each list cost the serving engine about a tenth of its host time. Before
    the ring comes back to a half, the copies out of it are waited for (an event recorded
    when it was left, long done by then: a half holds hundreds of steps' lists). A list too
    long for a half gets a pinned block of its own.
    """

    def __init__(self, device: torch.device, size: int = 1 << 16):
        self.device = device
        self.cuda = device.type == "cuda"
        self._half = size // 2
        self._ring = torch.empty(size, dtype=torch.long, pin_memory=True) if self.cuda else None
        self._host = self._ring.numpy() if self.cuda else None
        self._cur = 0  # the half in use
        self._at = 0  # the next free element (in the half in use)
        self._left = [None, None]  # per half: the event recorded when the ring last left it

    def __call__(self, values: List[int]) -> torch.Tensor:
        if not self.cuda:
            return torch.tensor(values, dtype=torch.long, device=self.device)
        n = len(values)
        if n > self._half:
            return torch.tensor(values, dtype=torch.long).pin_memory().to(self.device, non_blocking=True)
        at = self._place(n)
        self._host[at : at + n] = values
        return self._ring[at : at + n].to(self.device, non_blocking=True)

    def _place(self, n: int) -> int:
        """Where the next n values go: in the half in use if they fit, else at the start of the
        other half, once the copies out of it have been done."""
        if self._at + n > (self._cur + 1) * self._half:
            self._left[self._cur] = self._record()
            self._cur = 1 - self._cur
            if self._left[self._cur] is not None:
                self._left[self._cur].synchronize()
            self._at = self._cur * self._half
        at, self._at = self._at, self._at + n
        return at

    @staticmethod
    def _record():
        event = torch.cuda.Event()
        event.record()
        return event


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
        self.upload = Uploads(self.device)
        self._upload_wire = self.upload if self.wire == self.device else Uploads(self.wire)

    def prepare(self) -> None:
        """Records the decode graphs where they are used (before any request holds a row)."""
        if self.decoder.cuda_graphs:
            self.decoder.prepare()

    def prefill(self, rows: List[int], prompts: List[List[int]], all_logits: bool = False) -> torch.Tensor:
        """Logits (len(rows), vocab) of each prompt's last position, the prompts placed at
        positions 0 .. len - 1 of their cache rows, in one forward (right-padded to the longest:
        the padding writes cache positions past a prompt, which its decode steps overwrite before
        reading). `all_logits`: one prompt, the logits of every position (len, vocab)."""
        if all_logits and len(rows) != 1:
            raise ValueError("all_logits prefills one prompt at a time")
        longest = max(len(p) for p in prompts)
        padded = [p + [0] * (longest - len(p)) for p in prompts]
        t = self.upload(rows + [len(p) for p in prompts] + [x for p in padded for x in p])
        self._send(PREFILL, len(rows), int(all_logits), t)
        return self._prefill(len(rows), int(all_logits), t)

    def decode(self, tokens: torch.Tensor, positions: List[int]) -> torch.Tensor:
        """Logits (bs, vocab) of tokens[i] (a (bs,) tensor, on the model's device or the host) at
        positions[i] of cache row i, for rows 0 .. bs - 1. Waits for nothing on the device (the
        positions go up from pinned memory), so the host may go on while the step runs."""
        positions_t = self.upload(positions)
        t = torch.cat([tokens.to(self.device).reshape(-1), positions_t])
        kv_len = max(positions) + 1
        self._send(DECODE, len(positions), kv_len, t)
        return self._decode(len(positions), kv_len, t)

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
        dist.broadcast(self._upload_wire([kind, a, b, n]), src=0)
        if n:
            dist.broadcast(payload.to(self.wire), src=0)  # (already there, but for gloo with CUDA ranks)

    @torch.inference_mode()
    def _prefill(self, n_rows: int, all_logits: int, payload: torch.Tensor) -> torch.Tensor:
        rows, lengths = payload[:n_rows], payload[n_rows : 2 * n_rows]
        tokens = payload[2 * n_rows :].reshape(n_rows, -1)
        longest = tokens.shape[1]
        positions = torch.arange(longest, device=self.device)[None]  # (1, longest)
        if all_logits:
            return self.decoder.step(tokens, positions, longest, prefill=True, last_only=False, rows=rows)[0]
        return self.decoder.step(tokens, positions, longest, prefill=True, rows=rows, at=lengths - 1)[:, 0]

    @torch.inference_mode()
    def _decode(self, bs: int, kv_len: int, payload: torch.Tensor) -> torch.Tensor:
        tokens, positions = payload[:bs, None], payload[bs:, None]  # (bs, 1) each
        return self.decoder.step_rows(tokens, positions, kv_len)[:, 0]
