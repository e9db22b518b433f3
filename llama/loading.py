"""Moving weights from memory-mapped shards to their device, one tensor at a time.

On CUDA, bytes go through two pinned staging buffers: while the GPU copies one
buffer, the CPU (torch's multithreaded copy, which also pages the file in) fills the
other. Host memory stays at about one tensor plus the two buffers, whatever the model size.
"""

from typing import Dict, Iterable, Tuple

import torch

CHUNK_BYTES = 128 << 20


def _to_device_cpu(items: Iterable[Tuple[str, torch.Tensor]], device, dtype) -> Dict[str, torch.Tensor]:
    # Same dtype on CPU: the memory-mapped tensor is used as it is (no copy).
    return {k: v.to(device=device, dtype=dtype) for k, v in items}


def load_to_device(items: Iterable[Tuple[str, torch.Tensor]], device: torch.device,
                   dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """{key: tensor on `device` in `dtype`} from (key, CPU tensor) pairs, consumed lazily."""
    if device.type != "cuda":
        return _to_device_cpu(items, device, dtype)
    staging = [torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    done = [None, None]
    stream = torch.cuda.Stream(device)
    out, n = {}, 0
    with torch.cuda.stream(stream):
        for key, cpu in items:
            cpu = cpu.contiguous()
            gpu = torch.empty(cpu.shape, dtype=cpu.dtype, device=device)
            src, dst = cpu.reshape(-1).view(torch.uint8), gpu.reshape(-1).view(torch.uint8)
            for start in range(0, src.numel(), CHUNK_BYTES):
                size = min(CHUNK_BYTES, src.numel() - start)
                buf = n % 2
                if done[buf] is not None:
                    done[buf].synchronize()  # the GPU has finished reading this buffer
                staging[buf][:size].copy_(src[start : start + size])
                dst[start : start + size].copy_(staging[buf][:size], non_blocking=True)
                done[buf] = torch.cuda.Event()
                done[buf].record(stream)
                n += 1
            out[key] = gpu if gpu.dtype == dtype else gpu.to(dtype)
            del cpu
    stream.synchronize()
    return out
