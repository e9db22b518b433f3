"""One row times a 16-bit weight on the CPU (batch-1 decode), as code that torch.compile writes.

Why: torch's CPU matmul (oneDNN) reads a bf16 weight for one row at 11-14 GB/s on the
project's 2-core AVX-512 machines, where a plain sum streams at about 32 GB/s; batch-1
decode is nothing but such products, so it ran at a third of what the memory allows.
The same product written as an elementwise multiply and a row sum, which inductor turns
into a vectorized, OpenMP-parallel C++ loop over the rows, reads 25-38 GB/s there
(benchmarks/RESULTS.md). Long rows are summed in pieces of at most `PIECE` elements
(shorter inner loops measured faster: a 5632-wide row at 15 GB/s whole, 28 GB/s in four).

Nobody waits for the compiler. Each row width gets an AOTInductor package (a shared
library, any number of rows), kept in the start-up cache folder (`llama.cache`) under a
key of torch's version, this file, and the CPU's model and vector extensions; a later
run loads it in milliseconds. A missing package is built when the process that needed it
ends, by a detached, lowest-priority `python -m llama.kernels.cpu_gemv` (about half a
minute a width on 2 cores); until then that width's products are torch's matmul: a first
run is as fast as before, later runs are faster.
Where it cannot be built (no C++ compiler, an unsupported CPU) the failure is kept beside
the package's name, products stay torch's, and one line says so.
"""

import argparse
import atexit
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Set, Tuple

import torch
import torch.nn.functional as F

from llama import cache, distributed

PIECE = 2048
DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
MIN_ELEMENTS = 1 << 20  # smaller weights (test models) keep torch's matmul: nothing to win there
CHECK_EVERY = 1.0  # seconds between looks for packages being built

Key = Tuple[int, torch.dtype]
_READY: Dict[Key, Callable] = {}
_PENDING: Dict[Key, Path] = {}
_last_look = 0.0
_SAID: Set[Path] = set()  # failures said already


def pieces(k: int) -> int:
    """How many equal pieces a row of k is summed in: the fewest of at most PIECE elements."""
    for s in range(1, k + 1):
        if k % s == 0 and k // s <= PIECE:
            return s
    return k


class Product(torch.nn.Module):
    """(1, K) x @ w.T -> (1, N), float32 sums of `split` pieces of each row, in x's dtype."""

    def __init__(self, split: int):
        super().__init__()
        self.split = split

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        n, k = w.shape
        xs = x.float().view(1, self.split, k // self.split)
        ws = w.float().view(n, self.split, k // self.split)
        return (xs * ws).sum(-1).sum(-1).to(x.dtype)[None]


def _suits(w: torch.Tensor) -> bool:
    return (w.device.type == "cpu" and w.dtype in DTYPES and w.dim() == 2 and w.is_contiguous()
            and w.numel() >= MIN_ELEMENTS)


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x (one row) @ w.T goes through here now (its width's package is loaded)."""
    if _PENDING:
        _look()
    return ((w.shape[-1], w.dtype) in _READY and x.dtype == w.dtype and x.device.type == "cpu" and _suits(w)
            and x.numel() == w.shape[1])


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(1, K) x @ w.T -> (1, N) in x's dtype (see `usable`)."""
    return _READY[(w.shape[1], w.dtype)]([x.reshape(1, -1).contiguous(), w])[0]


@functools.lru_cache(maxsize=None)
def cpu_key() -> str:
    """What a package's code depends on: torch, this file, the CPU (model and vector extensions)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    parts = [torch.__version__, source, platform.machine(), model, torch.backends.cpu.get_cpu_capability()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def package_path(k: int, dtype: torch.dtype) -> Optional[Path]:
    """Where the package of row width k lives (None with the start-up cache off)."""
    root = cache.folder()
    return None if root is None else root / "cpu-gemv" / f"{cpu_key()}-k{k}-{DTYPES[dtype]}.pt2"


def prepare(weights: Iterable[torch.Tensor]) -> None:
    """Loads the packages of these weights' row widths (those that suit: 16-bit, on the CPU,
    large), and starts building the missing ones in the background."""
    if not hasattr(torch._C, "_aoti"):  # a torch without AOTInductor's runtime: torch's matmul
        return
    for w in weights:
        key = (w.shape[-1], w.dtype)
        if not _suits(w) or key in _READY or key in _PENDING:
            continue
        path = package_path(*key)
        if path is None:
            return
        if not _load(key, path) and not _failed(path):
            _PENDING[key] = path  # built when this process ends (`_build_at_exit`), for later runs


def _load(key: Key, path: Path) -> bool:
    if not path.exists():
        return False
    try:  # torch's loader itself: `torch._inductor.aoti_load_package` would import inductor (1.5 s)
        _READY[key] = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1).boxed_run
    except AttributeError:  # a torch without AOTInductor's runtime
        return False
    except Exception as e:  # a damaged or foreign file: built again
        warnings.warn(f"ignoring an unreadable package {path} ({type(e).__name__}: {e}); it will be built again")
        path.unlink(missing_ok=True)
        return False
    return True


def _failed(path: Path) -> bool:
    """A build that failed before (its reason kept beside the package's name): said once."""
    marker = path.with_suffix(".failed")
    if not marker.exists():
        return False
    if marker in _SAID:
        return True
    _SAID.add(marker)
    reason = marker.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
    distributed.log(f"batch-1 products on this CPU use torch's matmul: their compiled form could not be built "
                f"({reason[0][:200]}; delete {marker} to try again)")
    return True


def _look() -> None:
    """Loads the packages that have been built since the last look (at most once a CHECK_EVERY)."""
    global _last_look
    now = time.monotonic()
    if now - _last_look < CHECK_EVERY:
        return
    _last_look = now
    for key, path in list(_PENDING.items()):
        if _load(key, path) or _failed(path):
            del _PENDING[key]


def _build_at_exit() -> None:
    """Starts one detached, lowest-priority process that builds the packages still missing.
    Not earlier: on a small machine a compiler beside a running model slows it several
    times over, nice'd or not (measured on 2 cores: 2.4 s for what takes 0.3 s)."""
    paths = [p for p in _PENDING.values() if not p.exists() and not _failed(p)]
    if not paths:
        return
    fresh = []
    for path in paths:
        lock = path.with_suffix(".building")
        try:
            if lock.exists() and time.time() - lock.stat().st_mtime < 3600:
                continue  # another process builds it
            path.parent.mkdir(parents=True, exist_ok=True)
            lock.write_text(str(os.getpid()))
        except OSError:
            continue
        fresh.append(str(path))
    if not fresh:
        return
    # inductor writes a serial loop for one thread: the package gets this process's threads (2 at least)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(2, torch.get_num_threads())), PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[2])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    try:
        proc = subprocess.Popen([sys.executable, "-m", "llama.kernels.cpu_gemv", *fresh], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=os.name == "posix")
        os.setpriority(os.PRIO_PROCESS, proc.pid, 19)
    except (AttributeError, OSError):
        pass


atexit.register(_build_at_exit)


def build(k: int, dtype: torch.dtype, out: Path) -> None:
    """Compiles the package of row width k (any number of rows) to `out`, atomically; a failure
    is written to out.failed."""
    lock = out.with_suffix(".building")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".pt2", dir=out.parent)
    os.close(fd)
    try:
        rows = torch.export.Dim("rows", min=2, max=1 << 24)
        example = (torch.zeros(1, k, dtype=dtype), torch.zeros(64, k, dtype=dtype))
        program = torch.export.export(Product(pieces(k)), example, dynamic_shapes=({}, {0: rows}))
        from torch._inductor import aoti_compile_and_package

        aoti_compile_and_package(program, package_path=tmp)
        os.replace(tmp, out)
    except Exception as e:
        out.with_suffix(".failed").write_text(f"{type(e).__name__}: {e}\n")
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)
        lock.unlink(missing_ok=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Builds batch-1 product packages (see the module), one after another.")
    p.add_argument("paths", nargs="+", help="package paths, named as `package_path` names them")
    for path in map(Path, p.parse_args(argv).paths):
        k, dtype = path.stem.rsplit("-", 2)[1:]
        try:
            build(int(k[1:]), getattr(torch, dtype), path)
        except Exception:
            pass  # (kept in path.failed by build)


if __name__ == "__main__":
    main()
