"""Fast generation: joined projections, kernel layers, a static-shape step, CUDA graphs."""

from llama.fast.decoder import FaithfulDecoder, FastDecoder
from llama.fast.transform import transform

__all__ = ["FaithfulDecoder", "FastDecoder", "transform"]
