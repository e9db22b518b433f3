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
"""

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import triton

_STATE = threading.local()
MAX_THREADS = 8


def launch(kernel, grid):
    """`kernel[grid]`; while compiling ahead in this thread, the kernel's compile-only form."""
    if getattr(_STATE, "ahead", False):
        return lambda *args, **kwargs: kernel.warmup(*args, grid=grid, **kwargs)
    return kernel[grid]


def threads() -> int:
    """$LLAMA_COMPILE_THREADS, else the CPUs this process may use, at most 8."""
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
    most 8) instead of running; on leaving, every compile has finished. A kernel that fails to
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
