"""Compiling a step's Triton kernels before the step first runs, many at a time.

Triton compiles a kernel at its first launch with a new specialization, and then builds
that kernel's C launcher with the C compiler: one after another, seconds for a decode
step on a machine's first run. Inside `compiling()`, each launch through `launch` compiles
instead of running (Triton's `warmup`), in a pool of threads (Triton's `AsyncCompileMode`;
its compiler drops Python's lock while LLVM and ptxas work), and each thread builds its
kernel's launcher too. What they produce lands in Triton's caches, in memory and on disk,
so the real launches that follow start at once, and later processes find it on disk.
While compiling ahead no kernel runs, so the step's values are garbage: only a step whose
outputs are thrown away may run inside it.

`warm_up()` does what Triton does once a process before its first kernel (hashing its own
installation, loading its CUDA helper module), for a thread to do while the weights load.

Inside `noting()`, each launch compiled ahead is also noted (the kernel's name, its
tensors' dtypes, its other arguments), for the start-up cache to keep. A later process hands the
notes to `replay()` in a thread while its weights load: Triton's warm-up with each tensor
replaced by its dtype gives the same specialization (sizes, flags and 16-byte alignment,
which every noted tensor has), so the compiled kernels are loaded from Triton's disk cache
(or compiled) before the first step asks for them, and the compiling ahead of that step
finds them all in memory.
"""

import contextlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List

import torch
import triton

_STATE = threading.local()
MAX_THREADS = 8
_SCALARS = (bool, int, float, str, type(None))


def launch(kernel, grid):
    """`kernel[grid]`, as a programmatic dependent launch where `pdl()` says so (for kernels
    that take PDL); while compiling ahead in this thread, the kernel's compile-only form."""
    extra = {"PDL": True, "launch_pdl": True} if pdl() and "PDL" in getattr(kernel, "arg_names", ()) else {}
    if getattr(_STATE, "ahead", False):
        def compile_only(*args, **kwargs):
            kwargs.update(extra)
            _note(kernel, args, kwargs)
            return kernel.warmup(*args, grid=grid, **kwargs)

        return compile_only
    if not extra:
        return kernel[grid]
    run = kernel[grid]
    return lambda *args, **kwargs: run(*args, **kwargs, **extra)


_PDL = None


def pdl() -> int:
    """1 where kernels launch as programmatic dependent launches (Hopper GPUs and later: a
    kernel's programs start while the one before it finishes, and wait there for its results;
    on the H200 the 7B's bf16 decode went from 245 to 254 tokens/s, int4's from 403 to 407),
    else 0. $LLAMA_PDL=0 turns it off."""
    if _PDL is None:
        set_pdl(os.environ.get("LLAMA_PDL", "1").strip() != "0")
    return _PDL


def set_pdl(on: bool) -> None:
    """Launches from now on dependent (`on`, where the GPU has it) or plain, for comparing the
    two in one process; graphs recorded before keep their launches."""
    global _PDL
    _PDL = int(bool(on) and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
               and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


def _note(kernel, args, kwargs) -> None:
    """Keeps a launch's description for `noting()` (when this thread is noting), where dtypes
    stand in for its tensors exactly (every tensor 16-byte aligned, every other argument a
    plain value)."""
    noted = getattr(_STATE, "noted", None)
    if noted is None:
        return
    described = []
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.data_ptr() % 16:
                return
            described.append({"dtype": str(a.dtype).replace("torch.", "")})
        elif isinstance(a, _SCALARS):
            described.append(a)
        else:
            return
    if not all(isinstance(v, _SCALARS) for v in kwargs.values()):
        return
    call = {"kernel": kernel.__name__, "args": described, "kwargs": kwargs}
    noted.setdefault(json.dumps(call, sort_keys=True), call)


@contextlib.contextmanager
def noting() -> Iterator[List[dict]]:
    """Within, in this thread: each launch compiled ahead is noted; on leaving, the list given
    holds them, each once, in a JSON-ready form (for `replay` in a later process)."""
    noted: Dict[str, dict] = {}
    calls: List[dict] = []
    _STATE.noted = noted
    try:
        yield calls
    finally:
        _STATE.noted = None
        calls.extend(noted.values())


def replay(calls: List[dict], module, n_threads: int = 0) -> int:
    """Compiles ahead, side by side, the kernels of `module` that `calls` (from `noting()`
    in an earlier process) describe; returns how many it asked for. A description that no
    longer fits the code is skipped: that kernel is compiled at its first use instead."""
    asked = 0
    with compiling(n_threads):
        for call in calls:
            try:
                kernel = getattr(module, call["kernel"])
                args = [getattr(torch, a["dtype"]) if isinstance(a, dict) else a for a in call["args"]]
                kernel.warmup(*args, grid=(1,), **call["kwargs"])
                asked += 1
            except Exception:  # (a changed signature, a corrupt entry)
                continue
    return asked


def threads() -> int:
    """$LLAMA_COMPILE_THREADS, else the CPUs this process may use, at most MAX_THREADS."""
    env = os.environ.get("LLAMA_COMPILE_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus))


def _build_launcher(kernel) -> None:
    """Builds (or loads from Triton's cache) the C launcher of a compiled kernel, as its first
    launch would; the module lands in Triton's cache, where that launch finds it."""
    try:
        from triton.runtime.driver import driver

        driver.active.launcher_cls(kernel.src, kernel.metadata)
    except Exception:  # (Triton's internals differ) it is built at the first launch instead
        pass


_AsyncCompileMode = getattr(triton, "AsyncCompileMode", None)  # Triton 3.4 and later


if _AsyncCompileMode is not None:

    class _Ahead(_AsyncCompileMode):
        """Triton's asynchronous compilation, each kernel's launcher built in the same thread."""

        def submit(self, key, compile_fn, finalize_fn):
            def compile_and_build():
                kernel = compile_fn()
                _build_launcher(kernel)
                return kernel

            return super().submit(key, compile_and_build, finalize_fn)


@contextlib.contextmanager
def compiling(n_threads: int = 0):
    """Within: launches (in this thread) compile in `n_threads` threads (default: the CPUs, at
    most MAX_THREADS) instead of running; on leaving, every compile has finished. A kernel that fails to
    compile here is compiled again, and fails with its message, at its real launch. With a
    Triton too old for this, launches run as they always do."""
    if _AsyncCompileMode is None:
        yield
        return
    with ThreadPoolExecutor(n_threads or threads(), thread_name_prefix="llama-compile") as pool:
        with _Ahead(pool, ignore_errors=True):
            _STATE.ahead = True
            try:
                yield
            finally:
                _STATE.ahead = False


def warm_up(device) -> None:
    """What Triton does once a process before its first kernel, done now (for CUDA `device`)."""
    try:
        import torch
        from triton.compiler.compiler import make_backend
        from triton.runtime.cache import triton_key
        from triton.runtime.driver import driver

        torch.cuda.set_device(device)  # (in a new thread the CUDA device is GPU 0)
        triton_key()  # hashes Triton's own files
        make_backend(driver.active.get_current_target()).hash()  # loads the CUDA helper; asks ptxas its version
    except Exception:  # (Triton's internals differ) done at the first compile instead
        pass
