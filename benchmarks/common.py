"""What the benchmarks share: model shapes, random models built as `Llama.build` builds
them (no checkpoint on disk), the reference-style model, timing and the copy bandwidth."""

import copy
import statistics
import time
from typing import Optional

import torch
from torch import nn

from llama import build, quant
from llama.config import ModelArgs, expected_shapes, weight_bytes
from llama.layout import QuantSpec, split_dim
from llama.loading import empty_model
from llama.parallel import parallelize
from llama.tokenizer import Tokenizer
from llama.tools.random_checkpoint import random_tensor

SHAPES = {
    "1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, multiple_of=256),  # TinyLlama's shape
    "7B": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
}
TOKENIZER = "tests/fixtures/tokenizer.model"


def spec_for(fmt: str, args: ModelArgs, world_size: int = 1, group: int = 128) -> Optional[QuantSpec]:
    """The QuantSpec of a format name ('bf16', 'int8', 'int4', 'int4-g64', ...)."""
    if fmt in ("bf16", "fp16", "f32"):
        return None
    mode, _, g = fmt.partition("-g")
    group = int(g) if g else group
    return QuantSpec(mode, quant.choose_group(args.dim, args.ffn_hidden_dim, group, world_size) if mode == "int4" else 128)


def random_model(args: ModelArgs, dtype: torch.dtype, spec: Optional[QuantSpec] = None, world_size: int = 1,
                 rank: int = 0, device: str = "cuda", seed: int = 0) -> nn.Module:
    """This rank's model with seeded random weights, made one tensor at a time on `device` and
    (with `spec`) quantized as they come, as `Llama.build(quantize=...)` does while loading;
    its cache set up for args.max_batch_size x args.max_seq_len."""
    model = parallelize(empty_model(args), world_size)
    if spec is not None:
        quant.quantize_modules(model, spec)
    gen = torch.Generator(device=device).manual_seed(seed * 1000 + rank)

    def local(key, shape):
        dim = split_dim(key)
        return tuple(s // world_size if d == dim else s for d, s in enumerate(shape))

    items = ((k, random_tensor(k, local(k, s), gen, dtype, device)) for k, s in expected_shapes(args).items())
    if spec is not None:
        items = quant.quantize_items(items, spec, torch.device(device))
    model.load_state_dict(dict(items), assign=True)
    model.requires_grad_(False)
    model.setup_cache(args.max_batch_size, args.max_seq_len, torch.device(device), dtype)
    return model


def fast_decoder(model: nn.Module, dtype: torch.dtype, spec: Optional[QuantSpec] = None):
    """The model transformed for the fast path (as `Llama.build` does); returns its decoder."""
    return build.finish_model(model, dtype, spec, use_fast=True)


def with_fairscale_layers(model: nn.Module) -> nn.Module:
    """The reference's one-GPU model: every linear layer and the embedding replaced by
    fairscale's parallel layer at model-parallel size 1, holding the same weights (needs
    fairscale's model parallel set up)."""
    from fairscale.nn.model_parallel import layers as fs

    def column(lin, gather):
        new = fs.ColumnParallelLinear(lin.in_features, lin.out_features, bias=False, gather_output=gather,
                                      init_method=lambda w: w)
        new.weight = lin.weight
        return new

    def row(lin):
        new = fs.RowParallelLinear(lin.in_features, lin.out_features, bias=False, input_is_parallel=True,
                                   init_method=lambda w: w)
        new.weight = lin.weight
        return new

    emb = fs.ParallelEmbedding(model.tok_embeddings.num_embeddings, model.tok_embeddings.embedding_dim,
                               init_method=lambda w: w)
    emb.weight = model.tok_embeddings.weight
    model.tok_embeddings = emb
    model.output = column(model.output, True)
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        attn.wq, attn.wk, attn.wv = (column(m, False) for m in (attn.wq, attn.wk, attn.wv))
        attn.wo = row(attn.wo)
        ffn.w1, ffn.w3 = column(ffn.w1, False), column(ffn.w3, False)
        ffn.w2 = row(ffn.w2)
    return model


def no_eos(tokenizer: Tokenizer) -> Tokenizer:
    """Random weights emit EOS at random; every run here generates all its tokens."""
    tok = copy.copy(tokenizer)
    tok.eos_id = -100
    return tok


def sync_time(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def median_time(fn, repeats: int = 3) -> float:
    return statistics.median(sync_time(fn)[0] for _ in range(repeats))


def copy_bandwidth(gib: float = 4.0) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), median of 20."""
    n = int(gib * 2**30) // 4
    a, b = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    a.normal_()
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * n * 4 / sorted(times)[len(times) // 2]


def graph_time(fn, calls: int, repeats: int = 5) -> float:
    """Seconds per call of `fn(i)` for i in range(calls), replayed as one CUDA graph (median)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def bytes_per_token(args: ModelArgs, spec: Optional[QuantSpec], dtype=torch.bfloat16) -> int:
    """Bytes of weights a batch-1 decode step reads: every weight but the embedding (one row)."""
    return weight_bytes(args, dtype, spec) - args.vocab_size * args.dim * 2
