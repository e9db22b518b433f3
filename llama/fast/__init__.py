"""Fast generation: joined projections, kernel layers, a static-shape step, CUDA graphs."""

from llama.fast.decoder import FaithfulDecoder, FastDecoder
from llama.fast.transform import kernel_layers, transform

__all__ = ["FaithfulDecoder", "FastDecoder", "kernel_layers", "transform"]
