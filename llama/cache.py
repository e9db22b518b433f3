"""The start-up cache: what preparing the fast path produces, kept for later runs.

It holds Triton's compiled kernels (Triton's own cache, pointed here), the kernel
launch configurations measured on this GPU, and the CPU's compiled batch-1 products
(`llama.kernels.cpu_gemv`, folder cpu-gemv/, keyed there by torch, that code and the
CPU). Nothing in it depends on weight values.
Entries are keyed by everything they depend on (torch, Triton and this library's kernel
code, the GPU), so an entry written by another version or GPU is never read; writes are
atomic, so processes running side by side (torchrun ranks, two users) never corrupt it;
an unreadable entry is ignored with one warning and written again.

Where: `$LLAMA_CACHE`, else `$XDG_CACHE_HOME/llama`, else `~/.cache/llama`.
`LLAMA_CACHE=off` turns it off (Triton then uses its own default folder).
"""

import functools
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

_KERNEL_SOURCES = ("kernels/triton_kernels.py", "kernels/tuning.py", "cache.py")


def folder() -> Optional[Path]:
    """The cache folder, or None when turned off."""
    where = os.environ.get("LLAMA_CACHE")
    if where is not None and where.strip().lower() in ("off", "0", "false", "none", ""):
        return None
    if where:
        return Path(where).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llama"


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """A hash of the kernel code, so that a change to it invalidates what it produced."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in _KERNEL_SOURCES:
        try:
            digest.update((here / name).read_bytes())
        except OSError:
            digest.update(name.encode())
    return digest.hexdigest()[:16]


def device_key() -> str:
    """The GPU, torch, Triton and kernel-code versions an entry depends on."""
    parts = [f"torch-{torch.__version__}", f"code-{code_version()}"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        parts += [props.name.replace(" ", "_"), f"sm{props.major}{props.minor}"]
    try:
        import triton

        parts.append(f"triton-{triton.__version__}")
    except ImportError:
        pass
    return "-".join(parts)


def _entry(name: str, device_bound: bool) -> Optional[Path]:
    root = folder()
    if root is None:
        return None
    key = hashlib.sha256(device_key().encode()).hexdigest()[:20] if device_bound else "any"
    return root / "entries" / f"{name}-{key}.json"


def load_json(name: str, device_bound: bool = True) -> Optional[Any]:
    """An entry written by `save_json` under the same key, or None (absent, off, unreadable)."""
    path = _entry(name, device_bound)
    if path is None or not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("key") != device_key() and device_bound:
            return None
        return record["value"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(f"ignoring an unreadable start-up cache entry {path} ({e}); it will be written again")
        return None


def save_json(name: str, value: Any, device_bound: bool = True) -> Optional[Path]:
    """Writes an entry atomically (a temporary file, then a rename); None when the cache is off."""
    path = _entry(name, device_bound)
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"key": device_key(), "value": value}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not write the start-up cache entry {path} ({e.strerror})")
        return None
    return path


def use_for_triton() -> None:
    """Points Triton's compiled-kernel cache into this folder (unless the user set TRITON_CACHE_DIR)."""
    root = folder()
    if root is not None and "TRITON_CACHE_DIR" not in os.environ:
        os.environ["TRITON_CACHE_DIR"] = str(root / "triton")


def entry_count() -> int:
    """Files in the cache folder (compiled kernels among them): to tell whether a step compiled
    anything (0 when the cache is off or empty)."""
    root = folder()
    if root is None or not root.exists():
        return 0
    return sum(len(files) for _, _, files in os.walk(root))
