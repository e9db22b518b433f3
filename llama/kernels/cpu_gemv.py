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
run loads it in milliseconds. A missing package is built by a detached `python -m
llama.kernels.cpu_gemv` at the lowest priority (about half a minute a width on 2 cores;
it did not slow the model beside it, measured), which goes on if the process that
started it ends. Until a width's package is there its products are torch's matmul, from
then on the package's. A package gets its final name only after a trial run in a process
of its own (one that crashes or miscomputes is never used), and only from torch
`MIN_TORCH` on. Where it cannot be built (no C++ compiler, an unsupported CPU) the failure
is kept beside the package's name, products stay torch's, and one line says so.
"""

import argparse
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
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F

from llama import cache, distributed

PIECE = 2048
# AOTInductor packages ran here on torch 2.13 (a CPU build); on torch 2.11 (a CUDA build) one
# crashed the process that ran it. Older torch keeps its matmul; newer ones still trial-run
# each package in a process of its own before it is used (`build`).
MIN_TORCH = (2, 13)
DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
MIN_ELEMENTS = 1 << 20  # smaller weights keep torch's matmul: nothing to win there
MIN_WIDTH = 512  # narrower rows (test models: a vocabulary of rows 64 wide) keep it too
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


def _torch_version() -> Tuple[int, int]:
    major, minor = (torch.__version__.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _suits(w: torch.Tensor) -> bool:
    return (w.device.type == "cpu" and w.dtype in DTYPES and w.dim() == 2 and w.is_contiguous()
            and w.numel() >= MIN_ELEMENTS and w.shape[1] >= MIN_WIDTH)


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x (one row) @ w.T goes through here now (its width's package is loaded; no
    autograd: the package's result has no gradient)."""
    if _PENDING:
        _look()
    return ((w.shape[-1], w.dtype) in _READY and x.dtype == w.dtype and x.device.type == "cpu" and _suits(w)
            and x.numel() == w.shape[1] and not torch.is_grad_enabled())


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
    if not hasattr(torch._C, "_aoti") or _torch_version() < MIN_TORCH:  # torch's matmul
        return
    new = False
    for w in weights:
        key = (w.shape[-1], w.dtype)
        if not _suits(w) or key in _READY or key in _PENDING:
            continue
        path = package_path(*key)
        if path is None:
            return
        if not _load(key, path) and not _failed(path):
            _PENDING[key] = path
            new = True
    if new:
        _build_in_background()


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


def _build_in_background() -> None:
    """Starts one detached process, at the lowest priority (its scheduling group too: see
    `_lowest_priority`), that builds the packages still missing, one after another; it
    goes on if this process ends, and `usable` picks up what it has built."""
    paths = [p for p in _PENDING.values() if not p.exists() and not _failed(p)]
    if not paths:
        return
    fresh = []
    for path in paths:
        lock = path.with_suffix(".building")
        try:
            if lock.exists() and _alive(lock):
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
        pid = _start([sys.executable, "-m", "llama.kernels.cpu_gemv", *fresh], env)
    except OSError:
        return
    for path in fresh:  # the builder's own pid: a builder that was killed leaves a lock no one holds
        Path(path).with_suffix(".building").write_text(str(pid))


def _start(cmd: List[str], env: Dict[str, str]) -> int:
    """Starts a detached builder at the lowest priority; its pid."""
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=os.name == "posix")
    _lowest_priority(proc.pid)  # at once, not after its imports
    return proc.pid


def _alive(lock: Path) -> bool:
    """Whether the process named in a build lock still runs (an unreadable lock: for an hour)."""
    try:
        pid = int(lock.read_text().strip())
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError):
        try:
            return time.time() - lock.stat().st_mtime < 3600
        except OSError:
            return False
    return True



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
        trial = subprocess.run([sys.executable, "-m", "llama.kernels.cpu_gemv", "--trial", tmp, str(k),
                                DTYPES[dtype]], capture_output=True, text=True, timeout=600)
        if trial.returncode:
            how = f"signal {-trial.returncode}" if trial.returncode < 0 else f"exit {trial.returncode}"
            last = (trial.stderr.strip().splitlines() or [""])[-1]
            raise RuntimeError(f"the built package failed its trial run ({how}) {last}".strip())
        os.replace(tmp, out)
    except Exception as e:
        out.with_suffix(".failed").write_text(f"{type(e).__name__}: {e}\n")
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)
        lock.unlink(missing_ok=True)


def _lowest_priority(pid: int = 0) -> None:
    """A process (0: this one) and its session's scheduling group at the lowest priority: under
    Linux's autogroups a nice value counts only within a session, and a builder in a session
    of its own beside a running model slowed it 4-5x on 2 cores until its group was nice'd too."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, 19)
    except (AttributeError, OSError):
        pass
    try:
        if os.getsid(pid) != (pid or os.getpid()):
            return  # not a session of its own: the group is its parent's (a shell's) too; leave it
        with open(f"/proc/{pid or 'self'}/autogroup", "w") as f:
            f.write("19")
    except (AttributeError, OSError):
        pass


def trial(path: str, k: int, dtype: torch.dtype) -> None:
    """Runs a built package as a model would (weights of several row counts, inference mode,
    this process's threads) against torch's matmul; raises if it differs (a crash ends the
    process, which its builder sees)."""
    run = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1).boxed_run
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n in (2, 63, 4096):
            x = torch.randn(1, k, generator=gen).to(dtype)
            w = torch.nn.Parameter(torch.randn(n, k, generator=gen).to(dtype), requires_grad=False)
            got, want = run([x, w])[0], F.linear(x, w)
            if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=2e-2, atol=0.15):
                raise RuntimeError(f"the package's product differs from torch's for {n} rows")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Builds batch-1 product packages (see the module), one after another.")
    p.add_argument("paths", nargs="*", help="package paths, named as `package_path` names them")
    p.add_argument("--trial", nargs=3, metavar=("PATH", "K", "DTYPE"), help="trial-run one built package")
    a = p.parse_args(argv)
    _lowest_priority()
    if a.trial:
        trial(a.trial[0], int(a.trial[1]), getattr(torch, a.trial[2]))
        return
    for path in map(Path, a.paths):
        k, dtype = path.stem.rsplit("-", 2)[1:]
        try:
            build(int(k[1:]), getattr(torch, dtype), path)
        except Exception:
            pass  # (kept in path.failed by build)


if __name__ == "__main__":
    main()
