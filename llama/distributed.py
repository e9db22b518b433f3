"""Where the model runs: device, dtype, process group and model-parallel setup."""

import os
import socket
import sys
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def choose_device(device: Optional[str] = None) -> torch.device:
    """The device for this process: `device` if given, else CUDA (GPU LOCAL_RANK) when present, else CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA GPU; use device='cpu'")
        if dev.index is None:
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(
                    f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                    "start at most one process per GPU (torchrun --nproc_per_node)"
                )
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)  # NCCL collectives run on the current device
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' was asked for, but this torch has no MPS support")
    return dev


def choose_dtype(device: torch.device, dtype=None) -> torch.dtype:
    """`dtype` if given (a torch.dtype or a name such as 'bfloat16'); else bf16 on CUDA where
    supported (fp16 otherwise), fp16 on MPS, float32 on CPU."""
    if dtype is not None:
        if isinstance(dtype, torch.dtype):
            return dtype
        if str(dtype) not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of: {', '.join(sorted(_DTYPES))}")
        return _DTYPES[str(dtype)]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_model_parallel(model_parallel_size: Optional[int], device: torch.device) -> Tuple[int, int]:
    """Starts the process group (if none) and fairscale model parallel; returns (mp_rank, mp_size).

    Under torchrun the group comes from its environment; under plain `python` a
    one-process group is made on a free local port.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if model_parallel_size is None:
        model_parallel_size = world_size
    if model_parallel_size < 1:
        raise ValueError(f"model_parallel_size must be at least 1, got {model_parallel_size}")

    if not dist.is_initialized():
        if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend_for(device))
        elif model_parallel_size == 1:
            dist.init_process_group(
                backend_for(device), init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
            )
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if model_parallel_size > world_size:
        raise RuntimeError(
            f"model_parallel_size={model_parallel_size} needs {model_parallel_size} processes but "
            f"{world_size} started: launch with `torchrun --nproc_per_node {model_parallel_size} ...`"
        )

    if fs_init.model_parallel_is_initialized():
        current = fs_init.get_model_parallel_world_size()
        if current != model_parallel_size:
            raise RuntimeError(
                f"model parallel is already set up with size {current} in this process; "
                f"cannot build with model_parallel_size={model_parallel_size}"
            )
    else:
        if world_size % model_parallel_size:
            raise RuntimeError(
                f"model_parallel_size={model_parallel_size} does not divide the {world_size} started processes"
            )
        _quietly(fs_init.initialize_model_parallel, model_parallel_size)
    return fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()


def _quietly(fn, *args):
    """Runs fn with stdout silenced (fairscale prints its group sizes)."""
    saved, sys.stdout = sys.stdout, open(os.devnull, "w")
    try:
        return fn(*args)
    finally:
        sys.stdout.close()
        sys.stdout = saved


def is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def silence_other_ranks() -> None:
    """As the reference does: only rank 0 prints to stdout."""
    if not is_rank_zero():
        sys.stdout = open(os.devnull, "w")


def log(message: str) -> None:
    """One line of progress on rank 0's stderr."""
    if is_rank_zero():
        print(message, file=sys.stderr, flush=True)


def shutdown() -> None:
    """Ends the process group cleanly: every rank waits for the others, then leaves together
    (a rank exiting while a peer still holds a connection can abort that peer)."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def report(entry: Callable[[], object]) -> int:
    """Runs a command-line entry point; returns its status (an int it returns, else 0). A user
    error (a bad path, size or value: ValueError, which CheckpointError is, MemoryError,
    FileNotFoundError) prints as one line `error: ...` on rank 0 and gives status 2, instead of
    a traceback. Output cut short by a closed pipe (`... | head`) ends quietly."""
    try:
        code = entry()
    except (ValueError, MemoryError, FileNotFoundError) as e:
        if is_rank_zero():
            print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code if isinstance(code, int) else 0


def run_main(entry: Callable[[], object]) -> None:
    """`report(entry)`, then ends the process group (`shutdown`, or at once after an error) and
    exits with the status."""
    code = report(entry)
    if code == 0:
        shutdown()
    elif dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
