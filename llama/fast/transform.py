"""The fast path as a transform of the loaded model: joined projections, kernel layers.

wq/wk/wv become one projection `wqkv`, w1/w3 one gated projection `w13` (silu(w1 x) * w3 x
in one product), every other linear layer and norm its `llama.fast.modules` twin over the
same weights. Float or quantized, split over ranks or not: parallel wrappers stay around
the new local layers. Run it once, after loading and before `quant.prepare`.
"""

from typing import List

from torch import nn

from llama import parallel
from llama.fast.modules import Linear, Norm
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
        attn.wqkv = parallel.join([attn.wq, attn.wk, attn.wv], lambda parts: _cat(parts, gated=False))
        attn.wq = attn.wk = attn.wv = None
        ffn.w13 = parallel.join([ffn.w1, ffn.w3], lambda parts: _cat(parts, gated=True))
        ffn.w1 = ffn.w3 = None
        attn.wo = parallel.map_local(attn.wo, _kernel_layer)
        ffn.w2 = parallel.map_local(ffn.w2, _kernel_layer)
        layer.attention_norm, layer.ffn_norm = Norm.like(layer.attention_norm), Norm.like(layer.ffn_norm)
    model.output = parallel.map_local(model.output, _kernel_layer)
    model.norm = Norm.like(model.norm)
    return model
