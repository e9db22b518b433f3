"""Weight-only int8 and int4 quantization of the linear layers.

Formats (the same in memory before `prepare` and in saved checkpoints), for a weight
`X.weight` of shape (N out, K in):
- int8: `X.weight` int8 (N, K) and `X.weight_scale` float32 (N,): w = q * scale, one
  symmetric scale per output channel (absmax / 127 over the whole row);
- int4: `X.weight` uint8 (N, K // 2), two 4-bit values per byte (even column in the high
  nibble), and `X.weight_scales`, `X.weight_zeros` bf16 (N, K // group): w = (q - 8) *
  scale + zero, asymmetric per group of `group` input columns.
Embeddings and norms stay in 16 bit. `prepare` turns the stored form into what torch's
kernels take. int8: on CUDA a Triton kernel of this library's (`llama.gemv`; torch's
`_weight_int8pack_mm` is slower there than bf16) for up to 8 rows, else cuBLAS on the
weights cast to 16 bit; on CPU torch's `_weight_int8pack_mm`. int4: torch's "tinygemm"
`_weight_int4pack_mm` on CUDA (bf16) and `_weight_int4pack_mm_for_cpu` on CPU. Shapes or
dtypes those do not take are dequantized on the fly.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from llama import gemv

MODES = ("int8", "int4")
DEFAULT_GROUP = 128
LAYERS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")  # the linear layers quantized
_TINYGEMM_GROUPS = (32, 64, 128, 256)


@dataclass(frozen=True)
class Spec:
    """How a model's linear layers are quantized."""

    mode: str  # "int8" or "int4"
    group: int = DEFAULT_GROUP  # int4 only: input columns per scale

    def params(self) -> dict:
        """The `quantization` entry of a quantized checkpoint's params.json."""
        return {"mode": self.mode, "group_size": self.group} if self.mode == "int4" else {"mode": self.mode}


def check_mode(mode) -> Optional[str]:
    """`mode` if it is None, 'int8' or 'int4'; else ValueError naming the choices."""
    if mode is None or mode in MODES:
        return mode
    raise ValueError(f"quantize must be None, 'int8' or 'int4', got {mode!r}")


def choose_group(dim: int, hidden_dim: int, group: int = DEFAULT_GROUP, world_size: int = 1) -> int:
    """`group`, or the largest power of two below it that splits both input sizes (dim for
    wq..w3 and output, hidden_dim for w2) into whole groups on each of `world_size` ranks.

    E.g. 7B's FFN (11008 = 86 x 128) takes groups of 128 on 1 or 2 ranks, of 32 on 8.
    """
    if group < 1 or group & (group - 1):
        raise ValueError(f"group_size must be a power of two, got {group}")
    while group > 1 and (dim % (group * world_size) or hidden_dim % (group * world_size)):
        group //= 2
    return group


def spec_from_params(quantization) -> Optional[Spec]:
    """The Spec a checkpoint's params.json `quantization` entry describes (None: not quantized)."""
    if quantization is None:
        return None
    if not isinstance(quantization, dict) or quantization.get("mode") not in MODES:
        raise ValueError(f"params.json 'quantization' should be {{'mode': 'int8' | 'int4', ...}}, got {quantization!r}")
    return Spec(quantization["mode"], int(quantization.get("group_size", DEFAULT_GROUP)))


def is_quantized_layer(key: str) -> bool:
    """True for the weight keys this module quantizes (`layers.0.attention.wq.weight`, `output.weight`)."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in LAYERS


def is_aux_key(key: str) -> bool:
    """True for the scales and zeros stored beside a quantized weight."""
    return key.rsplit(".", 1)[-1] in ("weight_scale", "weight_scales", "weight_zeros")


# -- quantize / dequantize ----------------------------------------------------------------------


def quantize_int8(w: torch.Tensor, absmax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale float32 (N,)). `absmax` (N,): the rows' largest |w| when `w`
    is a slice of them (a model-parallel rank's), so every slice shares the row's scale."""
    w = w.float()
    if absmax is None:
        absmax = w.abs().amax(dim=1)
    scale = (absmax.float() / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def quantize_int4(w: torch.Tensor, group: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 (N, K // 2) packed, scales bf16 (N, K // group), zeros bf16 (N, K // group))."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 groups of {group} do not divide {k} input features")
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scales = ((hi - lo) / 15).clamp(min=1e-6).to(torch.bfloat16)
    zeros = (lo + 8 * scales.float()).to(torch.bfloat16)  # w = (q - 8) * scale + zero
    # quantize against the bf16 scale/zero that will be used to dequantize
    s, z = scales.float()[..., None], zeros.float()[..., None]
    q = torch.round((g - z) / s + 8).clamp_(0, 15).to(torch.uint8).reshape(n, k)
    return pack_int4(q), scales, zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K // 2) uint8, the even column in the high nibble."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 values 0..15."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    q = unpack_int4(packed).float()
    n, k = q.shape
    group = k // scales.shape[1]
    w = (q.reshape(n, -1, group) - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(n, k)


def tinygemm_scales(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(K // group, N, 2) scales and zeros, as `_weight_int4pack_mm` takes them."""
    return torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()


def quantize_weight(key: str, w: torch.Tensor, spec: Spec, absmax: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The stored form of weight `key` (e.g. 'layers.0.attention.wq.weight'), on w's device."""
    base = key[: -len("weight")]
    if spec.mode == "int8":
        q, scale = quantize_int8(w, absmax)
        return {key: q, base + "weight_scale": scale}
    q, scales, zeros = quantize_int4(w, spec.group)
    return {key: q, base + "weight_scales": scales, base + "weight_zeros": zeros}


def row_absmax(key: str, shards, world_size: int, spec: Spec) -> Optional[torch.Tensor]:
    """For int8 on several ranks, the largest |w| of each whole row of a row-parallel weight
    (cut from the source `shards`), so every rank's slice shares its row's scale and any
    world size quantizes alike; else None (the slice's own rows are whole)."""
    from llama.checkpoint import rank_tensor, split_dim

    if spec.mode != "int8" or world_size == 1 or split_dim(key) != 1:
        return None
    return rank_tensor(key, shards, 0, 1).abs().amax(dim=1)


def quantize_items(items, shards, world_size: int, spec: Spec, device: torch.device):
    """(key, tensor) of a rank's state (`items`, cut from the source `shards` for `world_size`
    ranks), with each linear weight replaced by its stored form, quantized on `device`; other
    tensors pass as they are. At most one float weight is held at a time."""
    for key, t in items:
        if not is_quantized_layer(key):
            yield key, t
            continue
        absmax = row_absmax(key, shards, world_size, spec)
        stored = quantize_weight(key, t.to(device), spec, None if absmax is None else absmax.to(device))
        del t
        yield from stored.items()


def stored_shapes(key: str, shape: Tuple[int, int], spec: Spec) -> Dict[str, Tuple[tuple, torch.dtype]]:
    """{key: (shape, dtype)} of the stored form of a float weight of `shape`."""
    n, k = shape
    base = key[: -len("weight")]
    if spec.mode == "int8":
        return {key: ((n, k), torch.int8), base + "weight_scale": ((n,), torch.float32)}
    return {key: ((n, k // 2), torch.uint8), base + "weight_scales": ((n, k // spec.group), torch.bfloat16),
            base + "weight_zeros": ((n, k // spec.group), torch.bfloat16)}


def weight_bytes(shape: Tuple[int, int], spec: Spec, dtype: torch.dtype) -> int:
    """Bytes a quantized (N, K) weight takes on the device once prepared."""
    n, k = shape
    elem = torch.empty((), dtype=dtype).element_size()
    if spec.mode == "int8":
        return n * k + n * elem
    return n * k // 2 + 2 * n * (k // spec.group) * 2


def model_bytes(args, spec: "Spec", dtype: torch.dtype, world_size: int = 1, loading: bool = False) -> int:
    """Bytes of a model's weights per process with its linear layers quantized to `spec`;
    `loading`: plus the float32 workspace of quantizing the largest weight on the device."""
    from llama.checkpoint import expected_shapes

    elem = torch.empty((), dtype=dtype).element_size()
    total, largest = 0, 0
    for key, shape in expected_shapes(args).items():
        if is_quantized_layer(key):
            total += weight_bytes(shape, spec, dtype)
            largest = max(largest, shape[0] * shape[1])
        else:
            total += elem * int(torch.Size(shape).numel())
    workspace = 4 * 4 * largest // world_size if loading else 0  # w in float32 and a few temporaries
    return total // world_size + workspace


# -- modules ------------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """y = x @ W.T for a quantized W (no bias), stored as described above until `prepare`."""

    def __init__(self, in_features: int, out_features: int, spec: Spec):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.kernel = None  # set by prepare
        for name, (shape, dtype) in stored_shapes("weight", (out_features, in_features), spec).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))

    @classmethod
    def like(cls, linear: nn.Module, spec: Spec) -> "QuantLinear":
        """A quantized stand-in for `linear` (nn.Linear or a fairscale parallel layer), with the
        same local shape and, for fairscale layers, the same collectives."""
        out_f, in_f = linear.weight.shape
        from llama import parallel

        if isinstance(linear, parallel.ColumnParallelLinear):
            return ColumnParallelQuantLinear(in_f, out_f, spec, linear.gather_output)
        if isinstance(linear, parallel.RowParallelLinear):
            return RowParallelQuantLinear(in_f, out_f, spec)
        return cls(in_f, out_f, spec)

    @classmethod
    def cat(cls, parts: List["QuantLinear"]) -> "QuantLinear":
        """One layer computing the outputs of `parts` side by side (their stored forms joined)."""
        if any(p.kernel is not None for p in parts):
            raise RuntimeError("quantized layers are joined (fast path) before quant.prepare(model), not after")
        spec = parts[0].spec
        fused = cls(parts[0].in_features, sum(p.out_features for p in parts), spec)
        for name, _ in list(fused.named_buffers(recurse=False)):
            setattr(fused, name, torch.cat([getattr(p, name) for p in parts], dim=0))
        return fused

    def dequantized(self) -> torch.Tensor:
        """The float32 (N, K) weight this layer holds, from its stored form."""
        if self.spec.mode == "int8":
            return dequantize_int8(self.weight, self.weight_scale)
        return dequantize_int4(self.weight, self.weight_scales, self.weight_zeros)

    def prepare(self, dtype: torch.dtype) -> None:
        """Puts the weights in the form of the fastest kernel for this device and dtype."""
        if self.kernel is not None:
            return
        device = self.weight.device
        n, k = self.out_features, self.in_features
        if self.spec.mode == "int8":
            self.weight_scale = self.weight_scale.to(dtype)
            if device.type == "cpu":
                self.kernel = "int8pack"
            elif device.type == "cuda":
                self.kernel = "int8triton" if gemv.available() else "int8cast"
            else:
                self.kernel = "dequant"
            return
        group = self.spec.group
        if device.type == "cuda" and dtype == torch.bfloat16 and group in _TINYGEMM_GROUPS and n % 8 == 0:
            tiles = next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)
            if tiles is not None:
                self.kernel = "tinygemm"
                self.weight = torch._convert_weight_to_int4pack(self.weight.contiguous(), tiles)
                self.scales_and_zeros = tinygemm_scales(self.weight_scales, self.weight_zeros)
                del self.weight_scales, self.weight_zeros
                return
        if device.type == "cpu" and group in _TINYGEMM_GROUPS and n % 16 == 0:
            self.kernel = "int4cpu"
            self.weight = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(self.weight).int(), 1)
            self.scales_and_zeros = tinygemm_scales(self.weight_scales, self.weight_zeros).to(dtype)
            del self.weight_scales, self.weight_zeros
            return
        self.kernel = "dequant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.kernel == "int8pack":
            y = torch._weight_int8pack_mm(x.contiguous(), self.weight, self.weight_scale)
        elif self.kernel == "int8triton" and x.shape[0] <= gemv.MAX_ROWS:
            y = gemv.mm(x, self.weight, self.weight_scale)
        elif self.kernel in ("int8triton", "int8cast"):
            y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale
        elif self.kernel == "tinygemm":
            y = torch._weight_int4pack_mm(x.contiguous(), self.weight, self.spec.group, self.scales_and_zeros)
        elif self.kernel == "int4cpu":
            y = torch._weight_int4pack_mm_for_cpu(x.contiguous(), self.weight, self.spec.group, self.scales_and_zeros)
        else:
            y = F.linear(x, self.dequantized().to(x.dtype))
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec}, kernel={self.kernel}"


class ColumnParallelQuantLinear(QuantLinear):
    """fairscale's ColumnParallelLinear (output features split) with a quantized weight."""

    def __init__(self, in_features: int, out_features: int, spec: Spec, gather_output: bool):
        super().__init__(in_features, out_features, spec)
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from llama import parallel

        return parallel.column_parallel(super().forward, x, self.gather_output)


class RowParallelQuantLinear(QuantLinear):
    """fairscale's RowParallelLinear (input features split, outputs summed) with a quantized weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from llama import parallel

        return parallel.row_parallel(super().forward, x)


class QuantSlice(nn.Module):
    """Columns [start, stop) of a joined layer's output: what one of its parts computed."""

    def __init__(self, joined: QuantLinear, start: int, stop: int):
        super().__init__()
        self._joined = (joined,)  # a tuple, so the joined layer is not registered twice
        self.start, self.stop = start, stop

    @property
    def weight(self) -> torch.Tensor:
        return self._joined[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._joined[0](x)[..., self.start : self.stop]


def quantize_modules(model: nn.Module, spec: Spec) -> nn.Module:
    """Replaces the linear layers of a meta-device Transformer (plain or parallelized) with
    QuantLinear stand-ins, ready for a quantized state dict; returns the model."""
    model.output = QuantLinear.like(model.output, spec)
    for layer in model.layers:
        for mod in (layer.attention, layer.feed_forward):
            for name in LAYERS:
                if hasattr(mod, name):
                    setattr(mod, name, QuantLinear.like(getattr(mod, name), spec))
    return model


def prepare(model: nn.Module, dtype: torch.dtype) -> None:
    """Converts every QuantLinear of `model` to its kernel's form (after loading, and after
    the fast path has joined its projections)."""
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.prepare(dtype)
