"""The checkpoint layout: Meta's key names, how shards split them, quantized forms, errors.

The bottom of the package: nothing here imports the rest of `llama`.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or written as asked; the message says why and what to do."""


# How fairscale splits each weight across model-parallel ranks (absent: replicated).
SPLIT_DIMS = {
    "tok_embeddings": 1,  # ParallelEmbedding splits the embedding dim
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,  # ColumnParallelLinear
    "wo": 1, "w2": 1,  # RowParallelLinear
}

# Weights in Meta's files that the model does not use.
UNUSED_KEYS = ("rope.freqs",)

# The linear layers that weight-only quantization replaces.
QUANT_LAYERS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
QUANT_MODES = ("int8", "int4")
DEFAULT_GROUP = 128
# Names stored beside a quantized weight `X.weight`.
AUX_SUFFIXES = ("weight_scale", "weight_scales", "weight_zeros")


def split_dim(key: str) -> Optional[int]:
    """The dim along which `key` is split across shards, or None if every shard holds all of it.

    A quantized weight's scales and zeros split with it, except an int8 row-parallel
    layer's per-output-channel scale, which every shard holds whole.
    """
    parts = key.split(".")
    if len(parts) < 2:
        return None
    dim = SPLIT_DIMS.get(parts[-2])
    return None if parts[-1] == "weight_scale" and dim == 1 else dim


def layer_keys(i: int) -> Tuple[str, ...]:
    """Meta's weight names of transformer block `i`."""
    p = f"layers.{i}."
    return tuple(p + k for k in (
        "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
        "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
        "attention_norm.weight", "ffn_norm.weight"))


@dataclass(frozen=True)
class QuantSpec:
    """How a model's linear layers are quantized (weight-only)."""

    mode: str  # "int8" or "int4"
    group: int = DEFAULT_GROUP  # int4 only: input columns per scale
    # The output head's mode. int8 by default, as llama.cpp's Q4_K_M keeps its output head in
    # 6 bits: it is the layer where 4-bit errors cost the most (measured in benchmarks/quality.py).
    output: str = "int8"

    def for_key(self, key: str) -> "QuantSpec":
        """The spec of the layer whose weight is `key` ('output.weight' takes `output`'s mode)."""
        if self.output != self.mode and key.split(".", 1)[0] == "output":
            return QuantSpec(self.output, self.group, self.output)
        return self

    def params(self) -> dict:
        """The `quantization` entry of a quantized checkpoint's params.json."""
        out = {"mode": self.mode, "group_size": self.group} if self.mode == "int4" else {"mode": self.mode}
        return out if self.output == self.mode else dict(out, output=self.output)


def spec_from_params(quantization) -> Optional[QuantSpec]:
    """The QuantSpec a params.json `quantization` entry describes (None: not quantized)."""
    if quantization is None:
        return None
    if not isinstance(quantization, dict) or quantization.get("mode") not in QUANT_MODES:
        raise CheckpointError(
            f"params.json 'quantization' should be {{'mode': 'int8' | 'int4', ...}}, got {quantization!r}")
    group = quantization.get("group_size", DEFAULT_GROUP)
    if not isinstance(group, int) or group < 1 or group & (group - 1):
        raise CheckpointError(f"params.json 'quantization' group_size must be a power of two, got {group!r}")
    output = quantization.get("output", quantization["mode"])  # older folders: the head in the same mode
    if output not in QUANT_MODES:
        raise CheckpointError(f"params.json 'quantization' output should be 'int8' or 'int4', got {output!r}")
    return QuantSpec(quantization["mode"], group, output)


def is_quantized_layer(key: str) -> bool:
    """True for the weight keys quantization replaces (`layers.0.attention.wq.weight`, `output.weight`)."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in QUANT_LAYERS


def is_aux_key(key: str) -> bool:
    """True for the scales and zeros stored beside a quantized weight."""
    return key.rsplit(".", 1)[-1] in AUX_SUFFIXES


def stored_form(key: str, shape: Tuple[int, int], spec: QuantSpec) -> Dict[str, Tuple[tuple, torch.dtype]]:
    """{key: (shape, dtype)} of the quantized form of a float (N out, K in) weight `key`.

    int8: `X.weight` int8 (N, K) and `X.weight_scale` float32 (N,): w = q * scale.
    int4: `X.weight` uint8 (N, K // 2), two 4-bit values a byte (the even column in the high
    nibble), `X.weight_scales` and `X.weight_zeros` bf16 (N, K // group): w = (q - 8) * scale + zero.
    """
    n, k = shape
    base = key[: -len("weight")]
    spec = spec.for_key(key)
    if spec.mode == "int8":
        return {key: ((n, k), torch.int8), base + "weight_scale": ((n,), torch.float32)}
    return {key: ((n, k // 2), torch.uint8), base + "weight_scales": ((n, k // spec.group), torch.bfloat16),
            base + "weight_zeros": ((n, k // spec.group), torch.bfloat16)}
