"""Memory planning: what a model needs on a device, checked before anything is allocated."""

from dataclasses import dataclass
from typing import List, Optional

import torch

from llama.model import ModelArgs

GiB = 1024**3


@dataclass
class MemoryPlan:
    weights: int  # bytes per process
    kv_cache: int  # bytes per process

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def param_count(args: ModelArgs) -> int:
    d, h, hd = args.dim, args.ffn_hidden_dim, args.head_dim
    attn = d * args.n_heads * hd * 2 + d * args.kv_heads * hd * 2
    per_layer = attn + 3 * d * h + 2 * d
    return args.n_layers * per_layer + 2 * args.vocab_size * d + d


def kv_cache_bytes(args: ModelArgs, dtype: torch.dtype, max_batch_size: int, max_seq_len: int) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * args.n_layers * max_batch_size * max_seq_len * args.kv_heads * args.head_dim * elem


def plan(args: ModelArgs, dtype: torch.dtype, world_size: int = 1, weight_bytes: Optional[int] = None) -> MemoryPlan:
    """Bytes each of `world_size` processes needs for weights and KV cache.

    `weight_bytes` overrides the weight size of `dtype` (e.g. for quantized weights).
    """
    if weight_bytes is None:
        weight_bytes = param_count(args) * torch.empty((), dtype=dtype).element_size()
    cache = kv_cache_bytes(args, dtype, args.max_batch_size, args.max_seq_len)
    return MemoryPlan(weights=weight_bytes // world_size, kv_cache=cache // world_size)


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


def _fitting(args: ModelArgs, dtype, world_size, budget, weight_bytes, quantized: bool) -> List[str]:
    """Settings that would fit `budget` bytes per process."""
    from llama import quant

    hints = []
    if not quantized:
        for mode in ("int8", "int4"):
            spec = quant.Spec(mode, quant.choose_group(args.dim, args.ffn_hidden_dim, world_size=world_size))
            weights = quant.model_bytes(args, spec, dtype, world_size, loading=True)
            if weights + plan(args, dtype, world_size, 0).kv_cache <= budget:
                hints.append(f"quantize='{mode}' (--quantize {mode})")
                break
    per_proc = plan(args, dtype, world_size, weight_bytes).weights
    room = budget - per_proc
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
    from llama.checkpoint import valid_world_sizes

    for m in valid_world_sizes(args, upto=16):
        if m > world_size and plan(args, dtype, m, weight_bytes).total <= budget:
            hints.append(f"{m} processes (torchrun --nproc_per_node {m}, one GPU each)")
            break
    return hints


def check_fits(args: ModelArgs, dtype: torch.dtype, world_size: int, device: torch.device,
               weight_bytes: Optional[int] = None, headroom: float = 0.95, spec=None,
               quantizing: bool = False) -> MemoryPlan:
    """Raises MemoryError, saying what would fit, if weights + KV cache exceed the device's free memory.

    spec: the `quant.Spec` of quantized linear layers (`quantizing`: quantized while loading).
    """
    from llama import quant

    if spec is not None and weight_bytes is None:
        weight_bytes = quant.model_bytes(args, spec, dtype, 1, loading=quantizing) * world_size
    need = plan(args, dtype, world_size, weight_bytes)
    free = free_bytes(device)
    if free is None or need.total <= free * headroom:
        return need
    hints = _fitting(args, dtype, world_size, int(free * headroom), weight_bytes, spec is not None)
    what = spec.mode if spec is not None else str(dtype).replace("torch.", "")
    raise MemoryError(
        f"the model needs {need.total / GiB:.2f} GiB on {device} per process "
        f"({need.weights / GiB:.2f} GiB weights in {what} + "
        f"{need.kv_cache / GiB:.2f} GiB KV cache for max_batch_size={args.max_batch_size} x "
        f"max_seq_len={args.max_seq_len}) but only {free / GiB:.2f} GiB is free. "
        + ("It would fit with: " + "; or ".join(hints) + "." if hints else "Use a larger device or more of them.")
    )
