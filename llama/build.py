"""From a checkpoint folder to a model ready to decode, in one fixed order:

device -> checkpoint (opened and checked) -> quantization plan -> memory plan -> model
(meta device) -> parallel -> quantized layers -> weights loaded -> KV cache -> fast path
-> quantized kernels' form -> decoder.
"""

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from llama import cache, distributed, fast, kernels, memory, quant
from llama.checkpoint import Checkpoint, check_split, open_checkpoint
from llama.config import choose_group
from llama.fast import FaithfulDecoder, FastDecoder
from llama.layout import DEFAULT_GROUP, CheckpointError, QuantSpec
from llama.loading import empty_model, load_rank
from llama.model import Transformer
from llama.parallel import parallelize
from llama.tokenizer import Tokenizer


@dataclass(frozen=True)
class BuildOptions:
    """How to build: every choice `Llama.build` takes, checked in one place."""

    max_seq_len: int
    max_batch_size: int
    model_parallel_size: Optional[int] = None
    seed: int = 1
    dtype: Union[None, str, torch.dtype] = None
    device: Optional[str] = None
    fast: Optional[bool] = None
    quantize: Optional[str] = None
    group_size: int = DEFAULT_GROUP
    threads: Optional[int] = None

    def __post_init__(self):
        for name in ("max_seq_len", "max_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive int, got {self.threads!r}")
        quant.check_mode(self.quantize)
        choose_group(1, 1, self.group_size)  # a power of two


def physical_cores() -> int:
    """Physical CPU cores available to this process (hyperthreads counted once)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        cpus = set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def set_threads(threads: Optional[int], world_size: int) -> int:
    """torch's intra-op threads: `threads`, or the physical cores shared between the processes."""
    n = threads or max(1, physical_cores() // max(1, world_size))
    torch.set_num_threads(n)
    return n


def quant_plan(ckpt: Checkpoint, quantize: Optional[str], group_size: int, world_size: int
               ) -> Tuple[Optional[QuantSpec], bool]:
    """(how the linear layers are quantized or None, whether that happens while loading)."""
    saved = ckpt.spec
    if saved is not None:
        if quantize not in (None, saved.mode):
            raise ValueError(
                f"{str(ckpt.folder)!r} is already quantized to {saved.mode}: drop quantize='{quantize}' (it loads "
                f"as {saved.mode} as it is), or quantize the original checkpoint to {quantize}"
            )
        return saved, False
    if quantize is None:
        return None, False
    if quantize == "int8":
        return QuantSpec("int8"), True
    return QuantSpec(quantize, choose_group(ckpt.args.dim, ckpt.args.ffn_hidden_dim, group_size, world_size)), True


def check_tokenizer(ckpt: Checkpoint, tokenizer: Tokenizer) -> None:
    """A Hugging Face model's vocabulary must hold the tokenizer's (Meta's take the tokenizer's size)."""
    if ckpt.kind == "hf" and tokenizer.n_words > ckpt.args.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.n_words} pieces but the model only {ckpt.args.vocab_size}: "
            f"use the tokenizer.model that came with {str(ckpt.folder)!r}"
        )


def build(ckpt_dir, tokenizer_path: str, opts: BuildOptions):
    """(model, tokenizer, decoder) for `ckpt_dir`, built in the order this module describes."""
    dev = distributed.choose_device(opts.device)
    dtype = distributed.choose_dtype(dev, opts.dtype)
    mp_rank, mp_size = distributed.init_model_parallel(opts.model_parallel_size, dev)
    torch.manual_seed(opts.seed)
    distributed.silence_other_ranks()
    if dev.type == "cpu":
        set_threads(opts.threads, mp_size)

    start = time.time()
    tokenizer = Tokenizer(model_path=tokenizer_path)
    ckpt = open_checkpoint(ckpt_dir, vocab_size=tokenizer.n_words)
    check_tokenizer(ckpt, tokenizer)
    spec, quantizing = quant_plan(ckpt, opts.quantize, opts.group_size, mp_size)
    args = ckpt.args
    groups = f", int4 groups of {spec.group}" if spec is not None and spec.mode == "int4" else ""
    check_split(args, mp_size, spec,
                detail=f" ({len(ckpt.paths)} shard(s), n_heads={args.n_heads}, n_kv_heads={args.kv_heads}{groups})",
                into=f"over {mp_size} processes", fix="it runs with --nproc_per_node in")
    args.max_seq_len, args.max_batch_size = opts.max_seq_len, opts.max_batch_size
    memory.check_fits(args, dtype, mp_size, dev, spec=spec, loading=quantizing)

    use_fast = default_fast(dev, spec) if opts.fast is None else opts.fast
    launches = launches_entry(args, dtype, spec, mp_size)
    # while the weights load: the tokenizer's piece table (for streaming), Triton's once-a-process
    # work and the kernels an earlier run noted; both threads are waited for, also after an error
    # (a process ending while one is inside C++ code would abort)
    pieces = threading.Thread(target=tokenizer.pieces, name="llama-tokenizer-pieces", daemon=True)
    pieces.start()
    if use_fast:
        kernels.preload(dev, launches)
    try:
        model = load_model(ckpt, mp_rank, mp_size, dev, dtype, spec, quantizing)
        distributed.wait_for_all()  # the slowest rank's loading is not a timeout
        model.setup_cache(opts.max_batch_size, opts.max_seq_len, dev, dtype)
        decoder = finish_model(model, dtype, spec, use_fast)
        if isinstance(decoder, FastDecoder) and decoder.cuda_graphs:
            with kernels.noting_launches(launches):
                prepare(decoder)
    finally:
        pieces.join()
        kernels.wait_for_preload()
    if distributed.is_rank_zero():
        print(f"Loaded in {time.time() - start:.2f} seconds")
    return model, tokenizer, decoder


def launches_entry(args, dtype: torch.dtype, spec: Optional[QuantSpec], world_size: int) -> str:
    """The start-up cache entry naming the kernels that preparing this model's decode path
    compiles: keyed by all they depend on here (shape, sizes, dtype, quantization, processes)."""
    what = repr((sorted(vars(args).items()), str(dtype), spec, world_size))
    return "launches-" + hashlib.sha256(what.encode()).hexdigest()[:16]


def prepare(decoder: FastDecoder) -> None:
    """Records the decode graphs before the first request, saying on rank 0 what it waited for."""
    where = cache.folder()
    before = cache.entry_count()
    seconds = decoder.prepare()
    compiled = cache.entry_count() - before
    buckets = decoder.buckets()
    sizes = f"{buckets[0]}..{buckets[-1]}" if len(buckets) > 1 else str(buckets[0])
    if where is None:
        source = "start-up cache off"
    elif compiled:
        source = f"compiled {compiled} kernel(s), kept in {where} for later runs"
    else:
        source = f"kernels from the start-up cache in {where}"
    distributed.log(f"prepared the fast decode path in {seconds:.1f} s (CUDA graphs for batch sizes {sizes}; {source})")


def load_model(ckpt: Checkpoint, rank: int, world_size: int, device: torch.device, dtype: torch.dtype,
               spec: Optional[QuantSpec], quantizing: bool) -> Transformer:
    """This rank's model with its weights on `device` (built on the meta device, split, its
    linear layers quantized if `spec`, then the weights assigned)."""
    model = parallelize(empty_model(ckpt.args), world_size)
    if spec is not None:
        quant.quantize_modules(model, spec)
    state = load_rank(ckpt, rank, world_size, device, dtype, spec if quantizing else None)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.requires_grad_(False)
    return model


def default_fast(device: torch.device, spec: Optional[QuantSpec]) -> bool:
    """The fast path unless asked otherwise: on CUDA; on the CPU for int4 weights, where it decoded
    20-40% faster than the faithful forward at the 1.1B shape on 2 cores, prompts faster too and
    memory the same (benchmarks/RESULTS.md); 16-bit and int8 weights keep the faithful forward
    on the CPU (measured gains there were smaller, and not in every measure)."""
    return device.type == "cuda" or (spec is not None and spec.mode == "int4")


def finish_model(model: Transformer, dtype: torch.dtype, spec: Optional[QuantSpec], use_fast: bool):
    """The last transforms, in the only order they work (the fast path joins quantized layers
    in their stored form, so before `quant.prepare`); returns the decoder."""
    on_cpu = model.rope.device.type == "cpu"
    if use_fast:
        fast.transform(model)
    elif spec is None and on_cpu and dtype in kernels.cpu_gemv.DTYPES:
        fast.kernel_layers(model)  # batch-1 products at the memory's speed (llama.kernels.cpu_gemv)
    if spec is not None:
        quant.prepare(model, dtype)
    if on_cpu:  # (the layers whose products go through `kernels.linear`)
        kernels.cpu_gemv.prepare(w for m in model.modules()
                                 if isinstance(m, (fast.modules.Linear, fast.modules.SideBySide)) for w in m.weights())
    return FastDecoder(model) if use_fast else FaithfulDecoder(model)

