"""Memory planning: what a model needs on a device, checked before anything is allocated."""

from dataclasses import dataclass
from typing import List, Optional

import torch

from llama.checkpoint import valid_world_sizes
from llama.config import ModelArgs, choose_group, kv_cache_bytes, weight_bytes
from llama.layout import QuantSpec

GiB = 1024**3


@dataclass
class MemoryPlan:
    weights: int  # bytes per process
    kv_cache: int  # bytes per process

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def plan(args: ModelArgs, dtype: torch.dtype, world_size: int = 1, spec: Optional[QuantSpec] = None,
         loading: bool = False) -> MemoryPlan:
    """Bytes each of `world_size` processes needs for weights (linear layers in `spec`'s form if
    given; `loading`: quantized while loading) and the KV cache of args.max_batch_size x
    args.max_seq_len."""
    cache = kv_cache_bytes(args, dtype, args.max_batch_size, args.max_seq_len)
    return MemoryPlan(weights=weight_bytes(args, dtype, spec, world_size, loading), kv_cache=cache // world_size)


def free_bytes(device: torch.device) -> Optional[int]:
    """Memory free for this process on `device` (None when it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None
    return None


def _fitting(args: ModelArgs, dtype, world_size: int, budget: int, spec: Optional[QuantSpec]) -> List[str]:
    """Settings that would fit `budget` bytes per process."""
    hints = []
    if spec is None:
        for mode in ("int8", "int4"):
            q = QuantSpec(mode, choose_group(args.dim, args.ffn_hidden_dim, world_size=world_size))
            if plan(args, dtype, world_size, q, loading=True).total <= budget:
                hints.append(f"quantize='{mode}'")
                break
    room = budget - plan(args, dtype, world_size, spec).weights
    if room > 0:
        per_token = kv_cache_bytes(args, dtype, 1, 1) // world_size
        tokens = room // per_token
        if tokens >= 1:
            seq = min(args.max_seq_len, tokens // max(args.max_batch_size, 1))
            if seq >= 16:
                hints.append(f"max_seq_len={seq} with max_batch_size={args.max_batch_size}")
            bs = tokens // args.max_seq_len
            if bs >= 1:
                hints.append(f"max_batch_size={min(bs, args.max_batch_size)} with max_seq_len={args.max_seq_len}")
    for m in valid_world_sizes(args, upto=16):
        if m > world_size and plan(args, dtype, m, spec).total <= budget:
            hints.append(f"{m} processes (torchrun --nproc_per_node {m}, one GPU each)")
            break
    return hints


def check_fits(args: ModelArgs, dtype: torch.dtype, world_size: int, device: torch.device,
               spec: Optional[QuantSpec] = None, loading: bool = False, headroom: float = 0.95) -> MemoryPlan:
    """Raises MemoryError, saying what would fit, if weights + KV cache exceed the device's free
    memory. spec: the quantized form of the linear layers (`loading`: quantized while loading)."""
    need = plan(args, dtype, world_size, spec, loading)
    free = free_bytes(device)
    if free is None or need.total <= free * headroom:
        return need
    hints = _fitting(args, dtype, world_size, int(free * headroom), spec)
    what = spec.mode if spec is not None else str(dtype).replace("torch.", "")
    raise MemoryError(
        f"the model needs {need.total / GiB:.2f} GiB on {device} per process "
        f"({need.weights / GiB:.2f} GiB weights in {what} + "
        f"{need.kv_cache / GiB:.2f} GiB KV cache for max_batch_size={args.max_batch_size} x "
        f"max_seq_len={args.max_seq_len}) but only {free / GiB:.2f} GiB is free. "
        + ("It would fit with: " + "; or ".join(hints) + "." if hints else "Use a larger device or more of them.")
    )
