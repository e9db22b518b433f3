"""Weight-only int8 and int4 quantization of the linear layers.

Formats (the same in memory and in saved checkpoints): `llama.layout.stored_form`.
int8 has one symmetric scale per output channel; int4 a scale and a zero per group of
`group` input columns, fitted for the least squared error. The output head is int8 unless
the spec says otherwise (`QuantSpec.output`); embeddings and norms stay in 16 bit.

Products: on CUDA, this package's Triton kernels read the stored form as it is
(`llama.kernels.quantized_linear`). On the CPU, torch's `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu` (the int4 weight repacked once, by `prepare`) for a few rows
(decode); for many (prompts) the weight in that same form dequantized a tile at a time
and torch's matmul (`llama.kernels.cpu_quantized_mm`). Elsewhere the weight is
dequantized on the fly.
"""

from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from llama import kernels, parallel
from llama.config import choose_group
from llama.kernels.reference import dequantize_int4, dequantize_int8, silu_mul, unpack_int4
from llama.checkpoint import rank_tensor
from llama.layout import QUANT_LAYERS, QUANT_MODES, QuantSpec, is_quantized_layer, split_dim, stored_form

Spec = QuantSpec  # the name callers have used
MODES = QUANT_MODES
LAYERS = QUANT_LAYERS
_TORCH_INT4_GROUPS = (32, 64, 128, 256)

__all__ = ["Spec", "QuantLinear", "quantize_weight", "quantize_items", "quantize_modules", "prepare",
           "check_mode", "choose_group", "dequantize_int8", "dequantize_int4", "unpack_int4", "pack_int4"]


def check_mode(mode) -> Optional[str]:
    """`mode` if it is None, 'int8' or 'int4'; else ValueError naming the choices."""
    if mode is None or mode in MODES:
        return mode
    raise ValueError(f"quantize must be None, 'int8' or 'int4', got {mode!r}")


# -- quantize ------------------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor, absmax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale float32 (N,)). `absmax` (N,): the rows' largest |w| when `w`
    is a slice of them (a model-parallel rank's), so every slice shares the row's scale."""
    w = w.float()
    if absmax is None:
        absmax = w.abs().amax(dim=1)
    scale = (absmax.float() / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


# Ranges tried for a group's 16 levels, in steps of the group's (max - min) / 15: the levels
# span the whole range (15), or clip the largest values of the group (up to 17 steps).
_INT4_SPANS = (15.0, 15.5, 16.0, 16.5, 17.0)


def _int4_fit(g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) float32 (..., 1) for groups g (..., G) with the least squared error
    found, w ~ (q - 8) * scale + zero. For each span in _INT4_SPANS the values are rounded,
    then scale and zero refitted to them by least squares; the error of each refit is
    computed from sums over the group (no second rounding), and the best is kept."""
    n = g.shape[-1]
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    sg, sgg = g.sum(-1, keepdim=True), torch.linalg.vecdot(g, g).unsqueeze(-1)
    best_err = best_s = best_z = None
    x = torch.empty_like(g)  # one buffer, and sums of products without temporaries: 1.7x faster on a CPU
    for span in _INT4_SPANS:
        s0 = ((hi - lo) / span).clamp(min=1e-6)
        torch.sub(g, lo, out=x).div_(s0).round_().clamp_(0, 15).sub_(8)  # q - 8 for w = (q - 8) * s0 + lo + 8 * s0
        sx = x.sum(-1, keepdim=True)
        sxx, sxg = torch.linalg.vecdot(x, x).unsqueeze(-1), torch.linalg.vecdot(x, g).unsqueeze(-1)
        det = n * sxx - sx * sx
        fits = det > 1e-3  # at least two different levels in the group
        s = torch.where(fits, (n * sxg - sx * sg) / det.clamp(min=1e-3), s0)
        s = torch.where(s > 1e-6, s, s0)
        z = (sg - s * sx) / n
        err = sgg - 2 * s * sxg - 2 * z * sg + s * s * sxx + 2 * s * z * sx + n * z * z
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        else:
            better = err < best_err
            best_err, best_s, best_z = torch.where(better, err, best_err), torch.where(better, s, best_s), \
                torch.where(better, z, best_z)
    return best_s, best_z


# Output rows quantized at a time: on a GPU 512 (fewer, larger launches); on a CPU as many as
# make 512K values, so that the fit's float32 temporaries (2 MB each) stay in the caches:
# 2-3x faster than 512 rows on a 2-core EPYC (37-83 against 116-128 M weights/s).
_INT4_ROWS_GPU, _INT4_VALUES_CPU = 512, 1 << 19


def quantize_int4(w: torch.Tensor, group: int,
                  rows: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 (N, K // 2) packed, scales bf16 (N, K // group), zeros bf16 (N, K // group)),
    w = (q - 8) * scale + zero, each group's scale and zero chosen for the least squared
    error (`_int4_fit`), `rows` output rows at a time (default: by device, see above)."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 groups of {group} do not divide {k} input features")
    if rows is None:
        rows = _INT4_ROWS_GPU if w.device.type != "cpu" else max(1, _INT4_VALUES_CPU // k)
    qs, scales, zeros = [], [], []
    for part in w.split(rows):
        g = part.float().reshape(part.shape[0], k // group, group)
        s, z = _int4_fit(g)
        s, z = s.to(torch.bfloat16), z.to(torch.bfloat16)
        # quantize against the bf16 scale/zero that will be used to dequantize
        q = torch.round((g - z.float()) / s.float() + 8).clamp_(0, 15).to(torch.uint8).reshape(-1, k)
        qs.append(pack_int4(q))
        scales.append(s.squeeze(-1))
        zeros.append(z.squeeze(-1))
    return torch.cat(qs), torch.cat(scales), torch.cat(zeros)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K // 2) uint8, the even column in the high nibble."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def quantize_weight(key: str, w: torch.Tensor, spec: Spec, absmax: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The stored form of weight `key` (e.g. 'layers.0.attention.wq.weight'), on w's device."""
    base = key[: -len("weight")]
    spec = spec.for_key(key)
    if spec.mode == "int8":
        q, scale = quantize_int8(w, absmax)
        return {key: q, base + "weight_scale": scale}
    q, scales, zeros = quantize_int4(w, spec.group)
    return {key: q, base + "weight_scales": scales, base + "weight_zeros": zeros}


def whole_row_absmax(shards, world_size: int, spec: Spec) -> Callable[[str], Optional[torch.Tensor]]:
    """For int8 on several ranks: key -> the largest |w| of each whole row of a row-parallel
    weight (cut from the source `shards`), so every rank's slice shares its row's scale and
    any world size quantizes alike; None where a slice's rows are whole."""
    def absmax(key: str) -> Optional[torch.Tensor]:
        if spec.for_key(key).mode != "int8" or world_size == 1 or split_dim(key) != 1:
            return None
        return rank_tensor(key, shards, 0, 1).abs().amax(dim=1)

    return absmax


def quantize_items(items: Iterable[Tuple[str, torch.Tensor]], spec: Spec, device: torch.device,
                   row_absmax: Callable[[str], Optional[torch.Tensor]] = lambda key: None
                   ) -> Iterator[Tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of a rank's state with each linear weight replaced by its stored form,
    quantized on `device`; other tensors pass as they are. At most one float weight is held at
    a time. `row_absmax(key)`: the whole rows' largest |w| where the weight is a slice of them."""
    for key, t in items:
        if not is_quantized_layer(key):
            yield key, t
            continue
        absmax = row_absmax(key)
        stored = quantize_weight(key, t.to(device), spec, None if absmax is None else absmax.to(device))
        del t
        yield from stored.items()


# -- the module ----------------------------------------------------------------------------------


def _int4pack_for_cpu(packed: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """The stored int4 weight (N, K // 2) in the CPU product's packed layout, converted `rows`
    output rows at a time (the conversion takes its input as int32: 8 bytes a weight byte,
    so a whole output layer at once would briefly need 8x its size)."""
    return torch.cat([torch._convert_weight_to_int4pack_for_cpu(unpack_int4(packed[i:i + rows]).int(), 1)
                      for i in range(0, packed.shape[0], rows)])


class QuantLinear(nn.Module):
    """y = x @ W.T for a quantized W (no bias), stored as `llama.layout.stored_form` says.

    `gated`: W is [W1; W3] and y = silu(x @ W1.T) * (x @ W3.T), the fast path's joined
    feed-forward projection.
    """

    fuses_residual = True  # (see llama.model.add_projection)

    def __init__(self, in_features: int, out_features: int, spec: Spec, gated: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.spec, self.gated = in_features, out_features, spec, gated
        self.kernel = None  # set by prepare
        for name, (shape, dtype) in stored_form("weight", (out_features, in_features), spec).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))

    @classmethod
    def like(cls, linear: nn.Module, spec: Spec) -> "QuantLinear":
        """A quantized stand-in for a local nn.Linear, with the same shape."""
        out_f, in_f = linear.weight.shape
        return cls(in_f, out_f, spec)

    @classmethod
    def cat(cls, parts: List["QuantLinear"], gated: bool = False) -> "QuantLinear":
        """One layer computing the outputs of `parts` side by side (their stored forms joined)."""
        if any(p.kernel is not None for p in parts):
            raise RuntimeError("quantized layers are joined (fast path) before quant.prepare(model), not after")
        fused = cls(parts[0].in_features, sum(p.out_features for p in parts), parts[0].spec, gated)
        for name, _ in list(fused.named_buffers(recurse=False)):
            setattr(fused, name, torch.cat([getattr(p, name) for p in parts], dim=0))
        return fused

    def dequantized(self) -> torch.Tensor:
        """The float32 (N, K) weight this layer holds, from its stored form."""
        if self.kernel == "int4cpu":
            raise RuntimeError("the int4 weight is in the CPU kernel's packed form: dequantize before prepare()")
        if self.spec.mode == "int8":
            return dequantize_int8(self.weight, self.weight_scale)
        return dequantize_int4(self.weight, self.weight_scales, self.weight_zeros)

    def prepare(self, dtype: torch.dtype) -> None:
        """Puts the weights in the form of the fastest kernel for this device and dtype."""
        if self.kernel is not None:
            return
        device = self.weight.device
        n = self.out_features
        if device.type == "cuda":
            self.kernel = "triton" if kernels.available() else "dequant"
        elif self.spec.mode == "int8":
            self.kernel = "int8pack" if device.type == "cpu" else "dequant"
        elif device.type == "cpu" and kernels.cpu.int4pack_layout() == "none":
            kernels.notice_once("int4 on this CPU: this torch has no CPU int4 product; each product "
                                "dequantizes its weight (slow)")
            self.kernel = "dequant"
        elif device.type == "cpu" and self.spec.group in _TORCH_INT4_GROUPS and n % 16 == 0:
            self.kernel = "int4cpu"
            self.weight = _int4pack_for_cpu(self.weight)
            self.scales_and_zeros = torch.stack([self.weight_scales.t(), self.weight_zeros.t()], dim=-1).to(dtype)
            del self.weight_scales, self.weight_zeros
        else:
            self.kernel = "dequant"
        if self.spec.mode == "int8":
            self.scale_in_dtype = self.weight_scale.to(dtype)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) @ W.T, not gated."""
        if self.kernel == "int8pack":
            x, scale = x.contiguous(), self.scale_in_dtype.to(x.dtype)
            y = kernels.cpu_quantized_mm(x, "int8", self.weight, scale, 0)
            return y if y is not None else torch._weight_int8pack_mm(x, self.weight, scale)
        if self.kernel == "int4cpu":
            x, scales_and_zeros = x.contiguous(), self.scales_and_zeros.to(x.dtype)
            y = kernels.cpu_quantized_mm(x, "int4", self.weight, scales_and_zeros, self.spec.group)
            return y if y is not None else torch._weight_int4pack_mm_for_cpu(x, self.weight, self.spec.group,
                                                                            scales_and_zeros)
        return F.linear(x, self.dequantized().to(x.dtype))

    def forward(self, x: torch.Tensor, norm=None, residual=None) -> torch.Tensor:
        """x @ W.T; `norm` (weight, eps): x RMSNorm'ed first; `residual`: added to the result."""
        if self.kernel == "triton":
            zeros = self.weight_zeros if self.spec.mode == "int4" else None
            scale = self.weight_scale if self.spec.mode == "int8" else self.weight_scales
            y = kernels.quantized_linear(x, self.spec.mode, self.weight, scale, zeros, self.spec.group, self.gated,
                                         norm, residual)
            if y is not None:
                return y
        if norm is not None:
            x = kernels.rms_norm(x, *norm)
        shape = x.shape
        y = self._product(x.reshape(-1, shape[-1])).reshape(*shape[:-1], self.out_features)
        y = silu_mul(y) if self.gated else y
        return y if residual is None else residual + y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.spec}, "
                f"kernel={self.kernel}{', gated' if self.gated else ''}")


def quantize_modules(model: nn.Module, spec: Spec) -> nn.Module:
    """Replaces the linear layers of a meta-device Transformer (plain or parallelized) with
    QuantLinear stand-ins, ready for a quantized state dict; returns the model."""
    for parent, name in parallel.linear_layers(model):
        layer_spec = spec.for_key(name + ".weight") if parent is model else spec
        setattr(parent, name, parallel.map_local(getattr(parent, name), lambda lin: QuantLinear.like(lin, layer_spec)))
    return model


def prepare(model: nn.Module, dtype: torch.dtype) -> None:
    """Converts every QuantLinear of `model` to its kernel's form (after loading, and after the
    fast path has joined its projections)."""
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.prepare(dtype)
