"""Fast generation: static cache, fused projections, compiled pieces, CUDA graphs."""

from llama.fast.decoder import FaithfulDecoder, FastDecoder
from llama.fast.forward import FastForward, fuse_projections

__all__ = ["FaithfulDecoder", "FastDecoder", "FastForward", "fuse_projections"]
