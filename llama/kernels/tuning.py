"""Launch configurations of the Triton kernels: defaults that suit Hopper-class GPUs at
Llama's shapes; the ones measured on GPUs of this kind (`configs.json`, written from
`benchmarks/kernels.py --tune`); and the ones measured on this very GPU, when the start-up
cache (`llama.cache`) holds them. Nothing is benchmarked while a model runs, so a first
run starts as fast as a later one.
"""

import functools
import json
from pathlib import Path
from typing import Dict

import torch

from llama import cache

SHIPPED = Path(__file__).with_name("configs.json")

# (fmt, gated) -> config for the one-row GEMV
GEMV_DEFAULTS = {
    "float": {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 1},
    "int8": {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1},
    "int4": {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1},
}
QMM_DEFAULT = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "FOLD": False}


@functools.lru_cache(maxsize=None)
def _tuned() -> Dict[str, dict]:
    """The configurations measured on this kind of GPU (shipped) and on this GPU (the cache folder)."""
    found = {}
    if torch.cuda.is_available():
        try:
            found.update(json.loads(SHIPPED.read_text()).get(torch.cuda.get_device_name(), {}))
        except (OSError, ValueError):
            pass
    found.update(cache.load_json("kernel-configs", device_bound=True) or {})
    return found


def group_key(fmt: str, group: int) -> str:
    return f"/g{group}" if fmt == "int4" and group != 128 else ""


def gemv_config(fmt: str, n: int, k: int, gated: bool, group: int) -> dict:
    cfg = (_tuned().get(f"gemv/{fmt}/{n}x{k}/{int(gated)}{group_key(fmt, group)}")
           or _tuned().get(f"gemv/{fmt}/{n}x{k}/{int(gated)}") or dict(GEMV_DEFAULTS[fmt]))
    block_k = cfg["BLOCK_K"]
    while block_k > 16 and (k < block_k // 2):  # small test widths: no wider than needed
        block_k //= 2
    if fmt == "int4":
        block_k = max(block_k, group)  # whole groups a step
    return dict(cfg, BLOCK_K=block_k)


def qmm_bucket(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def qmm_key(fmt: str, m: int, n: int, k: int, group: int) -> str:
    return f"qmm/{fmt}/{n}x{k}/{qmm_bucket(m)}{group_key(fmt, group)}"


def qmm_config(fmt: str, m: int, n: int, k: int, group: int) -> dict:
    """BLOCK_M/N/K, warps, stages and, for int4, FOLD: the scales and zeros applied to each
    tile's product (a tile within one group) rather than to the weights before it."""
    cfg = dict(_tuned().get(qmm_key(fmt, m, n, k, group)) or QMM_DEFAULT)
    cfg["BLOCK_M"] = qmm_bucket(m)
    if fmt == "int4":
        if "FOLD" not in cfg:  # measured before FOLD existed: tiles within a group, dequantized first
            cfg["FOLD"] = False
            cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group)
        elif cfg["FOLD"]:
            cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group)
    return cfg


def attention_config(bs: int, kv_heads: int, max_len: int) -> dict:
    """Splits of the cache per (row, kv head), so that the programs fill the GPU."""
    block_s = 64
    splits = 1
    while bs * kv_heads * splits < 256 and splits * block_s * 2 <= max_len:
        splits *= 2
    return {"splits": splits, "BLOCK_S": block_s}
