"""The fast path as a transform of the loaded model: joined projections, kernel layers.

wq/wk/wv become one projection `wqkv`, w1/w3 one gated projection `w13` (silu(w1 x) * w3 x
in one product), each taking the RMSNorm before it into its own kernel; every other linear
layer and the final norm become their `llama.fast.modules` twins over the same weights. Float or quantized, split over ranks or not: parallel wrappers stay around
the new local layers. Run it once, after loading and before `quant.prepare`.
"""

from typing import List

from torch import nn

from llama import parallel
from llama.fast.modules import Linear, Norm, NormLinear
from llama.model import Transformer
from llama.quant import QuantLinear


def _cat(parts: List[nn.Module], gated: bool) -> nn.Module:
    cls = QuantLinear if isinstance(parts[0], QuantLinear) else Linear
    return cls.cat(parts, gated)


def _kernel_layer(linear: nn.Module) -> nn.Module:
    return linear if isinstance(linear, QuantLinear) else Linear(linear.weight.detach())


def transform(model: Transformer) -> Transformer:
    """Rewrites `model` (loaded, on its device) for the fast path in place; returns it."""
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        if attn.wqkv is not None:
            raise RuntimeError("this model has been transformed for the fast path already")
        # each norm moves into the projection after it (one kernel for both)
        attn.wqkv = parallel.join([attn.wq, attn.wk, attn.wv],
                                  lambda parts: NormLinear(layer.attention_norm, _cat(parts, gated=False)))
        ffn.w13 = parallel.join([ffn.w1, ffn.w3], lambda parts: NormLinear(layer.ffn_norm, _cat(parts, gated=True)))
        attn.wq = attn.wk = attn.wv = ffn.w1 = ffn.w3 = None
        layer.attention_norm = layer.ffn_norm = nn.Identity()
        attn.wo = parallel.map_local(attn.wo, _kernel_layer)
        ffn.w2 = parallel.map_local(ffn.w2, _kernel_layer)
    model.output = parallel.map_local(model.output, _kernel_layer)
    model.norm = Norm.like(model.norm)
    return model


def kernel_layers(model: Transformer) -> Transformer:
    """Every plain linear layer of `model` becomes its kernel twin over the same weight (no
    copy, nothing joined), so that the faithful decoder's products take the kernels too (on
    the CPU: one row times a 16-bit weight, `llama.kernels.cpu_gemv`); the arithmetic of
    every other product is torch's, as before. In place; returns `model`."""
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        for owner, names in ((attn, ("wq", "wk", "wv", "wo")), (ffn, ("w1", "w2", "w3"))):
            for name in names:
                setattr(owner, name, parallel.map_local(getattr(owner, name), _kernel_layer))
    model.output = parallel.map_local(model.output, _kernel_layer)
    return model
