"""Safe file handling for checkpoints: what may be read, and writes that are never half done.

Reading: only regular files inside the checkpoint folder (no `..`, no absolute paths, no
devices, FIFOs or links that lead out of it), so a hostile checklist or index cannot
make a tool read elsewhere or hang on a pipe.

Writing: every file goes to a temporary name in the same folder, is flushed to disk and
renamed only when complete; no write follows a link; an output folder that already
holds a checkpoint, or is the input, is refused before anything is written; on any
failure what was written is removed and the error says what happened, a full disk in one
line with the space needed and free.
"""

import contextlib
import errno
import fnmatch
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple

from llama.layout import CheckpointError

CHECKPOINT_MARKERS = ("params.json", "config.json", "*.pth", "*.safetensors", "pytorch_model*.bin",
                      "*.index.json", "tokenizer.model", "checklist.chk")
_UMASK = os.umask(0o022)  # read (the only way), then put back
os.umask(_UMASK)


def inside(folder, name: str) -> Optional[Path]:
    """`folder / name` if `name` is a plain relative path that stays inside `folder` (links
    resolved); else None."""
    folder = Path(folder)
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
        return None
    path = folder / name
    try:
        if not path.resolve().is_relative_to(folder.resolve()):
            return None
    except (OSError, RuntimeError):
        return None
    return path


def regular_file(path) -> bool:
    """True for a regular file (following links: a link to one inside the folder is fine once
    `inside` has checked it); FIFOs, devices and folders are not."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def checkpoint_files(folder) -> List[str]:
    """Names of the files in `folder` that belong to a model checkpoint (Meta or Hugging Face),
    links among them (a dangling one too)."""
    names = os.listdir(folder)
    return sorted(n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in CHECKPOINT_MARKERS))


class NoSpace(CheckpointError):
    """The disk of the output folder is full (or would be)."""


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def prepare_output(out_dir, inputs: Iterable = (), needed: Optional[int] = None) -> Tuple[Path, bool]:
    """(the output folder, whether it was created here); CheckpointError before anything is
    written if it is one of `inputs`, lies inside one, already holds checkpoint files, or is
    on a disk with less than `needed` bytes free."""
    out = Path(out_dir)
    for src in inputs:
        src = Path(src)
        if src.exists() and (out.resolve() == src.resolve() or out.resolve().is_relative_to(src.resolve())):
            raise CheckpointError(f"the output folder {str(out)!r} is the input {str(src)!r} (or inside it): "
                                  "write to a new or empty folder")
    if out.is_symlink():
        raise CheckpointError(f"the output folder {str(out)!r} is a symbolic link: give the real folder")
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(f"{str(out)!r} exists and is not a folder: write to a new or empty folder")
        held = checkpoint_files(out)
        if held:
            raise CheckpointError(f"{str(out)!r} already holds a checkpoint ({', '.join(held[:4])}): write to a "
                                  "new or empty folder")
    free = _free(out) if needed is not None else None
    if free is not None and free < needed:
        raise NoSpace(_space_message(out, needed))
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the output folder {str(out)!r}: {e.strerror}") from None
    return out, created


def _free(folder: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(_existing(folder)).free
    except OSError:
        return None


def _space_message(folder: Path, needed: Optional[int]) -> str:
    free = _free(folder)
    parts = [f"no space left on the disk of {str(folder)!r}"]
    if needed is not None:
        parts.append(f"{needed / 2**20:.0f} MB needed")
    if free is not None:
        parts.append(f"{free / 2**20:.0f} MB free")
    return ": ".join(parts[:1]) + (": " + ", ".join(parts[1:]) if len(parts) > 1 else "") + \
        "; free some space or write elsewhere, then run again"


def write_atomic(path, write: Callable[[Path], None], needed: Optional[int] = None) -> Path:
    """Writes a file by calling `write(tmp_path)` on a temporary name in the same folder, then
    flushes and renames it to `path`. A link at `path` is replaced, never written through. On
    any failure the temporary file is removed; a full disk raises CheckpointError saying so."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # as a plain open() would make it (mkstemp makes 0600)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if _out_of_space(e):
            raise NoSpace(_space_message(path.parent, needed)) from None
        raise
    return path


def _out_of_space(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save reports a failed write as a RuntimeError with the stream's message, safetensors
    # as its own error with the OS's
    text = str(e)
    return isinstance(e, Exception) and any(m in text for m in ("No space left", "unexpected pos", "file write failed",
                                                                "os error 28"))


def write_text(path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def copy_file(src, dst) -> Path:
    """Copies `src` to `dst` atomically (the output is a new file, never the source)."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and src.resolve() == dst.resolve():
        raise CheckpointError(f"cannot copy {str(src)!r} onto itself")
    return write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp), needed=src.stat().st_size)


@contextlib.contextmanager
def output_transaction(out: Path, created: bool, needed: Optional[int] = None):
    """Removes every file written into `out` (and `out` itself if it was `created` here) when the
    body fails, so a failed tool leaves nothing behind. A full disk is then told in one line,
    with the space the whole output needs (`needed`, when known) and the space now free."""
    before = set(os.listdir(out))
    try:
        yield
    except BaseException as e:
        for name in set(os.listdir(out)) - before:
            with contextlib.suppress(OSError):
                (out / name).unlink()
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        if isinstance(e, NoSpace) and needed is not None:
            raise NoSpace(_space_message(out, needed)) from None
        raise
