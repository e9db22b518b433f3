"""Where the model runs: device, dtype, process group and model-parallel setup; how a
multi-process run ends (an error on one rank, a rank that stops answering, Ctrl-C)."""

import contextlib
import os
import signal
import socket
import sys
from datetime import timedelta
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


DEFAULT_TIMEOUT_S = 120
PATIENT = timedelta(days=30)  # waits on a person (a chat's next line) or on the slowest rank's loading


def timeout() -> timedelta:
    """How long a rank waits for the others in one collective before the run ends:
    LLAMA_TIMEOUT_S seconds (default 120)."""
    text = os.environ.get("LLAMA_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < PATIENT.total_seconds():
        raise ValueError(f"LLAMA_TIMEOUT_S must be a number of seconds above 0, got {text!r}")
    return timedelta(seconds=seconds)


_patient = None  # a gloo group of every rank without the timeout (`share`, `wait_for_all`)


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

    limit = timeout()
    if not dist.is_initialized():
        if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend_for(device), timeout=limit)
        elif model_parallel_size == 1:
            dist.init_process_group(
                backend_for(device), init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=limit
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
        for group in (fs_init.get_model_parallel_group(), fs_init.get_data_parallel_group(),
                      fs_init.get_pipeline_parallel_group()):
            with contextlib.suppress(RuntimeError, AttributeError):  # a backend (or torch) without it: torch's default
                group.set_timeout(limit)  # fairscale's groups get torch's defaults (10 or 30 minutes)
        global _patient
        if world_size > 1 and _patient is None:
            _patient = dist.new_group(backend="gloo", timeout=PATIENT)
    return fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()


def share(obj):
    """Rank 0's `obj` (anything picklable) on every rank. The others wait for it as long as it
    takes, not LLAMA_TIMEOUT_S: for what a person types."""
    if _patient is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_patient)
    return box[0]


def wait_for_all() -> None:
    """Waits until every rank is here, as long as it takes (ranks load at their own pace; the
    timeout counts from the first collective after this)."""
    if _patient is not None:
        dist.barrier(group=_patient)


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
    FileNotFoundError) prints as one line `error: ...` and gives status 2, instead of a
    traceback; with several ranks, the rank it happened on prints it, once for the whole run.
    A rank that lost the others (one died, or stopped answering for LLAMA_TIMEOUT_S) says so
    in one line, unless another rank has told its own error; status 1. Ctrl-C: status 130,
    quietly. Output cut short by a closed pipe (`... | head`) ends quietly."""
    try:
        code = entry()
    except KeyboardInterrupt:
        return 130
    except (ValueError, MemoryError, FileNotFoundError) as e:
        _tell(str(e))
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except RuntimeError as e:
        if not _peer_lost(e):
            raise
        if not _told():
            seconds = timeout().total_seconds()
            _tell(f"another process did not answer within {seconds:g} s (it is stopped or hung): the run ends; "
                  "LLAMA_TIMEOUT_S=SECONDS waits longer" if "timed out" in str(e).lower() else
                  "another process ended without a message (killed, or crashed: see its output above): the run ends")
        return 1
    return code if isinstance(code, int) else 0


_PEER_LOST = ("connection closed by peer", "connection reset by peer", "timed out", "broken pipe",
              "communicator was aborted")


def _peer_lost(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because another rank died or stopped answering."""
    text = str(e).lower()
    return (dist.is_initialized() and dist.get_world_size() > 1
            and (isinstance(e, dist.DistError) or any(m in text for m in _PEER_LOST)))


def _store():
    """The run's key-value store (torchrun's), where ranks leave their errors; None if unreachable."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.distributed_c10d._get_default_store()


def _told() -> bool:
    """Whether a rank has already told an error."""
    try:
        store = _store()
        return store is not None and store.add("llama/errors", 0) > 0
    except Exception:  # the store went with its host
        return False


def _tell(message: str) -> None:
    """Prints `error: message` on stderr (`error on rank N: ...` off rank 0), unless another rank
    has already printed the same message. Before the process group exists, rank 0 alone prints."""
    if not dist.is_initialized():
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {message}", file=sys.stderr, flush=True)
        return
    rank = dist.get_rank()
    try:
        store = _store()
        if store is not None:
            n = store.add("llama/errors", 1)
            store.set(f"llama/error/{n}", message)
            if n > 1 and store.get("llama/error/1").decode() == message:
                return
    except Exception:
        pass
    where = f" on rank {rank}" if rank else ""
    print(f"error{where}: {message}", file=sys.stderr, flush=True)


def run_main(entry: Callable[[], object]) -> None:
    """`report(entry)`, then ends the process group (`shutdown` after success, at once after an
    error) and exits with the status. SIGTERM (torchrun ending the run) unwinds as an exit, so
    what a tool was writing is cleaned up and a terminal is put back."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def whole():
        code = entry()
        code = code if isinstance(code, int) else 0
        if code == 0:
            shutdown()
        return code

    try:
        code = report(whole)
    except KeyboardInterrupt:  # a second Ctrl-C, or one that came while an error was told
        code = 130
    finally:  # on the way out, a signal just ends the process (no traceback from exit handlers)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    if code != 0 and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    sys.exit(code)
