"""Moving weights from the shards to their device, one tensor at a time.

On CUDA, bytes go through pinned staging buffers, two per reader: while the GPU copies
one, the CPU fills the other. A shard that loads as it is (no resharding) is read with
plain sequential file reads at its tensors' offsets; otherwise each tensor is cut from
the memory-mapped shards. Host memory stays at about one tensor plus the buffers,
whatever the model size. On the CPU, a tensor already in the right dtype is used straight
from the memory map.
"""

import struct
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Tuple

import torch

from llama.checkpoint import Checkpoint
from llama.config import ModelArgs
from llama.layout import UNUSED_KEYS, QuantSpec, is_aux_key
from llama.model import Transformer
from llama.quant import quantize_items, whole_row_absmax

CHUNK_BYTES = 128 << 20
READERS = 4


def empty_model(args: ModelArgs) -> Transformer:
    """The model on the meta device, nothing allocated: weights load next (`assign=True`)."""
    with torch.device("meta"):
        return Transformer(args)


def as_dtype(key: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in the model's `dtype` if it is a float weight; quantized weights and their scales
    keep their own dtypes."""
    if not t.is_floating_point() or t.dtype == dtype or is_aux_key(key):
        return t
    return t.to(dtype)


def iter_to_device(items: Iterable[Tuple[str, torch.Tensor]], device: torch.device) -> Iterator[Tuple[str, torch.Tensor]]:
    """(key, tensor on `device`) for each (key, CPU tensor), moved one at a time as asked for.

    On CUDA the bytes go through two pinned buffers on a side stream; each tensor is ready
    for the current stream when yielded. On the CPU a tensor is used as it is (no copy).
    """
    if device.type != "cuda":
        yield from ((k, v.to(device)) for k, v in items)
        return
    staging = [torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    done = [None, None]
    stream, current = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    n = 0
    for key, cpu in items:
        cpu = cpu.contiguous()
        gpu = torch.empty(cpu.shape, dtype=cpu.dtype, device=device)  # on the current stream
        stream.wait_stream(current)  # its memory may have been in use there until now
        src, dst = cpu.reshape(-1).view(torch.uint8), gpu.reshape(-1).view(torch.uint8)
        for start in range(0, src.numel(), CHUNK_BYTES):
            size = min(CHUNK_BYTES, src.numel() - start)
            buf = n % 2
            if done[buf] is not None:
                done[buf].synchronize()  # the GPU has finished reading this buffer
            staging[buf][:size].copy_(src[start : start + size])
            with torch.cuda.stream(stream):
                dst[start : start + size].copy_(staging[buf][:size], non_blocking=True)
                done[buf] = torch.cuda.Event()
                done[buf].record(stream)
            n += 1
        current.wait_stream(stream)
        del cpu, src
        yield key, gpu
    stream.synchronize()


def load_to_device(items: Iterable[Tuple[str, torch.Tensor]], device: torch.device,
                   dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """{key: tensor on `device` in `dtype`} from (key, CPU tensor) pairs, consumed lazily."""
    return {k: as_dtype(k, t, dtype) for k, t in iter_to_device(items, device)}


def tensor_offsets(path: Path, state: Dict[str, torch.Tensor]) -> Optional[Dict[str, int]]:
    """Byte offset in `path` of each tensor of `state`, a `torch.load(path, mmap=True)` result.

    torch maps the whole file once, so a storage's address minus the mapping's start is its
    record's offset in the zip archive. Returns None (use the mapped tensors instead) if the
    offsets cannot be worked out or do not hold the tensors' bytes.
    """
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            starts = []
            for info in zf.infolist():
                if "/data/" in info.filename:
                    f.seek(info.header_offset)
                    name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
                    starts.append(info.header_offset + 30 + name_len + extra_len)
        tensors = {k: t for k, t in state.items() if t.numel() > 0}
        if not starts or not tensors:
            return None
        base = min(t.untyped_storage().data_ptr() for t in tensors.values()) - min(starts)
        offsets = {
            k: t.untyped_storage().data_ptr() - base + t.storage_offset() * t.element_size() for k, t in tensors.items()
        }
        with open(path, "rb") as f:  # spot-check the first bytes of every tensor
            for k, t in tensors.items():
                if not t.is_contiguous():
                    return None
                f.seek(offsets[k])
                want = t.reshape(-1)[:8].view(torch.uint8).numpy().tobytes()
                if f.read(len(want)) != want:
                    return None
        return offsets
    except (OSError, zipfile.BadZipFile, struct.error, RuntimeError):
        return None


def read_to_device(path: Path, state: Dict[str, torch.Tensor], offsets: Dict[str, int], keys,
                   device: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Reads the tensors `keys` of one shard with plain sequential file reads into pinned
    buffers and copies them to `device`, with READERS threads each owning two buffers.

    Avoids page-faulting a memory map: reads from the page cache run at memory speed.
    """
    out = {k: torch.empty(state[k].shape, dtype=state[k].dtype, device=device) for k in keys}
    queue = sorted((k for k in keys if state[k].numel() > 0), key=offsets.get)
    lock = threading.Lock()

    def worker(_):
        pin = device.type == "cuda"
        staging = [torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        views = [memoryview(b.numpy()) for b in staging]
        done = [None, None]
        stream = torch.cuda.Stream(device) if pin else None
        n = 0
        with open(path, "rb", buffering=0) as f:
            while True:
                with lock:
                    if not queue:
                        break
                    key = queue.pop(0)
                dst = out[key].reshape(-1).view(torch.uint8)
                for start in range(0, dst.numel(), CHUNK_BYTES):
                    size = min(CHUNK_BYTES, dst.numel() - start)
                    buf = n % 2
                    if done[buf] is not None:
                        done[buf].synchronize()
                    f.seek(offsets[key] + start)
                    got = f.readinto(views[buf][:size])
                    if got != size:
                        raise OSError(f"{path}: short read of {key} ({got} of {size} bytes)")
                    if stream is None:
                        dst[start : start + size].copy_(staging[buf][:size])
                        continue
                    with torch.cuda.stream(stream):
                        dst[start : start + size].copy_(staging[buf][:size], non_blocking=True)
                        done[buf] = torch.cuda.Event()
                        done[buf].record(stream)
                    n += 1
        if stream is not None:
            stream.synchronize()

    with ThreadPoolExecutor(READERS) as pool:
        list(pool.map(worker, range(READERS)))
    return {k: as_dtype(k, t, dtype) for k, t in out.items()}


def load_rank(ckpt: Checkpoint, rank: int, world_size: int, device: torch.device, dtype: torch.dtype,
              spec: Optional[QuantSpec] = None) -> Dict[str, torch.Tensor]:
    """This rank's weights on `device` in `dtype`, from the checkpoint's shards (any shard
    count); with `spec`, the linear layers quantized one tensor at a time on `device`.

    On CUDA, when this rank's shard is one file as it is, that file is read directly;
    otherwise each tensor is cut from the memory-mapped shards and staged.
    """
    shards = ckpt.shards
    if spec is not None:
        return _load_quantized(ckpt, rank, world_size, device, dtype, spec)
    if device.type == "cuda" and len(shards) == world_size and isinstance(shards[rank], dict):
        offsets = tensor_offsets(ckpt.paths[rank], shards[rank])
        if offsets is not None:
            keys = [k for k in shards[rank] if k not in UNUSED_KEYS]
            return read_to_device(ckpt.paths[rank], shards[rank], offsets, keys, device, dtype)
    return load_to_device(ckpt.rank_state(rank, world_size), device, dtype)


def _load_quantized(ckpt: Checkpoint, rank: int, world_size: int, device: torch.device, dtype: torch.dtype,
                    spec: QuantSpec) -> Dict[str, torch.Tensor]:
    """Float weights quantized as they arrive on the device: at most one is there in 16 bit.

    An int8 row-parallel slice takes its scale from the whole row, so any world size gives
    the same numbers as one process.
    """
    items = iter_to_device(ckpt.rank_state(rank, world_size), device)
    absmax = whole_row_absmax(ckpt.shards, world_size, spec)
    return {k: as_dtype(k, t, dtype) for k, t in quantize_items(items, spec, device, absmax)}
