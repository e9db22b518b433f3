"""Checkpoints on disk: opening and checking one (the same routine for build and every tool),
resharding as pure slicing, and writing Meta's format.

A checkpoint of N shards loads on any world size M whose split dims divide: each rank takes
its slice of every tensor straight from the memory-mapped shards (`rank_tensor`). A Hugging
Face folder opens as one whole Meta shard, converted lazily (`llama.hf`).
"""

import hashlib
import json
import math
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from llama import files, hf
from llama.config import ModelArgs, params_from_hf, stored_shapes
from llama.layout import UNUSED_KEYS, CheckpointError, QuantSpec, split_dim

StateDict = Dict[str, torch.Tensor]
SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")


@dataclass
class Checkpoint:
    """An opened, checked checkpoint: its sizes and its shards, memory-mapped."""

    folder: Path
    kind: str  # "meta" or "hf"
    params: dict  # params.json as written (Meta) or worked out from config.json (Hugging Face)
    args: ModelArgs  # the stored weights' sizes (vocab_size set)
    paths: List[Path]  # shard files in rank order (Hugging Face: config.json)
    shards: List[Mapping]  # state dicts, memory-mapped (Hugging Face: one lazy mapping)

    @property
    def spec(self) -> Optional[QuantSpec]:
        """How the stored linear layers are quantized (None: float)."""
        return self.args.quant_spec

    def rank_state(self, rank: int, world_size: int) -> Iterator[Tuple[str, torch.Tensor]]:
        """(key, tensor) of `rank`'s share of the model for `world_size` ranks, without the unused
        keys, each cut from the shards only when asked for."""
        for k in self.shards[0]:
            if k not in UNUSED_KEYS:
                yield k, rank_tensor(k, self.shards, rank, world_size)


def _folder(ckpt_dir) -> Path:
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint directory {str(folder)!r} does not exist; pass as ckpt_dir the folder "
            "download.sh made (e.g. llama-2-7b/), holding params.json and consolidated.*.pth"
        )
    return folder


def shard_paths(ckpt_dir) -> List[Path]:
    """The checkpoint's shards in rank order (consolidated.00.pth, consolidated.01.pth, ...),
    each a regular file; a gap in the numbering is a missing shard."""
    folder = _folder(ckpt_dir)
    paths = sorted(folder.glob("*.pth"))
    if not paths:
        raise CheckpointError(
            f"no checkpoint files found in {str(folder)!r}: expected Meta's consolidated.00.pth ... "
            "(run download.sh, or check the path), or a Hugging Face folder with config.json"
        )
    for p in paths:
        if not files.regular_file(p) or files.inside(folder, p.name) is None:
            raise CheckpointError(f"{str(p)!r} is not a regular file of the folder (a pipe, device, folder or a "
                                  "link out of it): replace it with the downloaded shard")
    numbers = [int(m.group(1)) for m in (SHARD_NAME.fullmatch(p.name) for p in paths) if m]
    if len(numbers) == len(paths) and numbers != list(range(len(paths))):
        absent = [f"consolidated.{i:02d}.pth" for i in range(max(numbers) + 1) if i not in numbers]
        raise CheckpointError(f"shard(s) {', '.join(absent)} missing from {str(folder)!r}: the folder holds "
                              f"{len(paths)} of {max(numbers) + 1} shards; download them again")
    return paths


def read_params(ckpt_dir) -> dict:
    """The checkpoint's params.json as a dict."""
    folder = _folder(ckpt_dir)
    path = folder / "params.json"
    if not path.exists() and not any(folder.glob("*.pth")):
        raise CheckpointError(
            f"{str(folder)!r} is neither a Meta checkpoint (params.json and consolidated.*.pth) "
            "nor a Hugging Face Llama folder (config.json and its weights): check the path"
        )
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} is missing: every Meta checkpoint folder has a params.json")
    if not files.regular_file(path):
        raise CheckpointError(f"{str(path)!r} is not a regular file")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}); download it again") from None
    if not isinstance(params, dict):
        raise CheckpointError(f"{str(path)!r} should hold a JSON object of model sizes")
    return params


def load_shard(path: Path) -> StateDict:
    """One shard, memory-mapped: tensors are read from disk only when used."""
    if not files.regular_file(path):
        raise CheckpointError(f"{str(path)!r} is not a regular file")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError, ValueError) as e:
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(
            f"cannot read shard {str(path)!r} ({size} bytes): it is truncated or corrupt ({e}). "
            "Download it again (download.sh resumes and checks md5)."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"shard {str(path)!r} does not hold a state dict of tensors")
    return state


def tensor_shape(shard: Mapping, key: str) -> tuple:
    """A tensor's shape; lazy shards (Hugging Face checkpoints) tell it without reading the tensor."""
    return tuple(shard.shape_of(key)) if hasattr(shard, "shape_of") else tuple(shard[key].shape)


def _dtype_of(shard: Mapping, key: str) -> Optional[torch.dtype]:
    return shard.dtype_of(key) if hasattr(shard, "dtype_of") else shard[key].dtype


def model_args(params: dict, where, **overrides) -> ModelArgs:
    """ModelArgs from params, or CheckpointError naming the file and the bad field."""
    try:
        return ModelArgs.from_params(params, **overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"params.json in {str(where)!r} does not describe a Llama model: {e}; correct it, or "
                              "download it again") from None


def open_checkpoint(ckpt_dir, vocab_size: Optional[int] = None) -> Checkpoint:
    """Opens and checks a checkpoint folder: Meta's (params.json and consolidated.*.pth, any
    shard count, float or quantized by `llama.tools.quantize`) or a Hugging Face Llama folder.

    The shards are memory-mapped; nothing is read beyond their indexes. `vocab_size`: the
    tokenizer's, which Meta's weights must match (default: the weights'); a Hugging Face
    config.json gives its own.
    """
    folder = _folder(ckpt_dir)
    if hf.is_hf_dir(folder):
        config = hf.read_config(folder)
        params = params_from_hf(config)
        state = hf.HFState(folder, config)
        args = model_args(params, folder)
        ckpt = Checkpoint(folder, "hf", params, args, [folder / hf.CONFIG], [state])
    else:
        params = read_params(folder)
        args = model_args(params, folder)  # sizes checked before any shard is opened
        paths = shard_paths(folder)
        shards = [load_shard(p) for p in paths]
        check_shards(paths, shards)
        if "output.weight" not in shards[0]:
            raise CheckpointError(f"the shards in {str(folder)!r} have no output.weight: is this a Llama checkpoint?")
        weights_vocab = tensor_shape(shards[0], "output.weight")[0] * len(shards)
        args = model_args(params, folder, vocab_size=vocab_size or weights_vocab)
        ckpt = Checkpoint(folder, "meta", params, args, paths, shards)
    check_against_params(ckpt)
    return ckpt


def rank_tensor(key: str, shards: Sequence[Mapping], rank: int, world_size: int) -> torch.Tensor:
    """`key`'s slice for `rank` of `world_size`, cut from the N source shards without merging them all."""
    dim = split_dim(key)
    if dim is None or world_size == len(shards):
        return shards[0][key] if dim is None else shards[rank][key]
    local = tensor_shape(shards[0], key)[dim]
    whole = local * len(shards)
    if whole % world_size:
        raise CheckpointError(f"{key}: size {whole} does not split into {world_size} equal parts")
    size = whole // world_size
    start = rank * size
    pieces = []
    for i, shard in enumerate(shards):  # shard i holds [i * local, (i + 1) * local)
        lo, hi = max(start, i * local), min(start + size, (i + 1) * local)
        if lo < hi:
            pieces.append(shard[key].narrow(dim, lo - i * local, hi - lo))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def shard_for_rank(shards: Sequence[Mapping], rank: int, world_size: int) -> StateDict:
    """Rank `rank`'s whole shard of `world_size` (every key, `rope.freqs` too), as compact tensors
    (a saved view would write its whole source storage)."""
    return {k: rank_tensor(k, shards, rank, world_size).clone() for k in shards[0]}


def check_shards(paths: Sequence[Path], shards: Sequence[Mapping]) -> None:
    """Raises CheckpointError unless the shards hold the same keys and consistent shapes."""
    keys = set(shards[0])
    for path, shard in zip(paths[1:], shards[1:]):
        if set(shard) != keys:
            diff = sorted(keys.symmetric_difference(shard))[:5]
            raise CheckpointError(f"shard {path.name} holds other tensors than {paths[0].name}: {diff}")
        for k, t in shard.items():
            ref = shards[0][k]
            if t.shape != ref.shape or t.dtype != ref.dtype:
                raise CheckpointError(
                    f"shards do not match: {k} is {tuple(ref.shape)} {ref.dtype} in {paths[0].name} "
                    f"but {tuple(t.shape)} {t.dtype} in {path.name}; the folder mixes files of different models"
                )


def _missing_shards(ckpt: Checkpoint, expected: Dict[str, tuple]) -> Optional[str]:
    """A message if the shards are slices of a model of more shards than the folder holds
    (every split weight is the same whole fraction of its expected size), else None."""
    n = len(ckpt.shards)
    totals = set()
    for key, shape in expected.items():
        dim = split_dim(key)
        if dim is None or key in ("tok_embeddings.weight", "output.weight"):  # their sizes hang on the vocabulary
            continue
        local = tensor_shape(ckpt.shards[0], key)
        if len(local) != len(shape) or any(a != b for d, (a, b) in enumerate(zip(local, shape)) if d != dim):
            return None
        if local[dim] == 0 or shape[dim] % local[dim]:
            return None
        totals.add(shape[dim] // local[dim])  # the shard count these slices come from
    if len(totals) != 1:
        return None
    total = totals.pop()
    if total <= n:
        return None
    listed = ""
    checklist = files.inside(ckpt.folder, "checklist.chk")
    if checklist is not None and files.regular_file(checklist):
        names = re.findall(r"consolidated\.\d+\.pth", checklist.read_text(errors="replace"))
        absent = sorted({x for x in names if not (ckpt.folder / x).exists()})
        if absent:
            listed = f" ({', '.join(absent)}, listed in checklist.chk)"
    return (f"the folder {str(ckpt.folder)!r} holds {n} of the model's {total} shards: the missing shard(s)"
            f"{listed} must be downloaded again")


def check_against_params(ckpt: Checkpoint) -> None:
    """Raises CheckpointError if the weights are not the keys, shapes and dtypes params.json
    (and the tokenizer) imply."""
    args, shards, folder = ckpt.args, ckpt.shards, ckpt.folder
    stored = stored_shapes(args)
    expected = {k: shape for k, (shape, _) in stored.items()}
    present = set(shards[0])
    missing = sorted(set(expected) - present)
    if missing:
        raise CheckpointError(
            f"the shards in {str(folder)!r} lack {len(missing)} weight(s) the model needs, "
            f"e.g. {missing[:3]}: params.json says n_layers={args.n_layers}; is this a Llama checkpoint?"
        )
    extra = sorted(present - set(expected) - set(UNUSED_KEYS))
    if extra:
        raise CheckpointError(
            f"the shards in {str(folder)!r} hold {len(extra)} weight(s) this model has no place for, e.g. "
            f"{extra[:3]}: params.json (n_layers={args.n_layers}) does not describe these weights; use the files "
            "that came together (download them again)"
        )
    n = len(shards)
    for key, shape in expected.items():
        local = tensor_shape(shards[0], key)
        dim = split_dim(key)
        whole = tuple(s * n if d == dim else s for d, s in enumerate(local))
        if whole != shape:
            lost = _missing_shards(ckpt, expected)
            if lost:
                raise CheckpointError(lost)
            hint = (
                "the tokenizer's vocabulary size differs from the model's: use the tokenizer.model that came with these weights"
                if key in ("tok_embeddings.weight", "output.weight") and whole[0] != shape[0]
                else "params.json does not match the weights"
            )
            raise CheckpointError(
                f"{key} is {whole} in the checkpoint but {shape} is expected from params.json "
                f"(dim={args.dim}, n_heads={args.n_heads}, n_kv_heads={args.kv_heads}, "
                f"vocab_size={args.vocab_size}): {hint}"
            )
        want = stored[key][1]
        got = _dtype_of(shards[0], key)
        if want is None and got is not None and not (got.is_floating_point and got.itemsize >= 2):
            raise CheckpointError(f"{key} is stored as {got}, not as floating-point weights (bfloat16, float16 or "
                                  "float32): the file is damaged or not a Llama checkpoint; download it again")
        if want is not None and got is not None and got != want:
            raise CheckpointError(
                f"{key} is {got} but params.json says the weights are quantized ({args.quantization}), "
                f"which stores it as {want}: the files and params.json do not belong together"
            )


def valid_world_sizes(args: ModelArgs, upto: int = 64, spec: Optional[QuantSpec] = None) -> List[int]:
    """World sizes whose ranks each get whole heads and equal slices of every split weight
    (and, for int4 weights, whole groups: `spec`, or the checkpoint's own quantization)."""
    sizes = (args.n_heads, args.kv_heads, args.dim, args.ffn_hidden_dim)
    if args.vocab_size > 0:
        sizes += (args.vocab_size,)
    spec = spec or args.quant_spec
    if spec is not None and spec.mode == "int4":
        sizes += (args.dim // spec.group, args.ffn_hidden_dim // spec.group)
    return [m for m in range(1, upto + 1) if all(s % m == 0 for s in sizes)]


def check_split(args: ModelArgs, n: int, spec: Optional[QuantSpec] = None, *, detail: str = "", into: str,
                fix: str) -> None:
    """Raises CheckpointError, listing the sizes that work, unless `n` ranks or shards each get
    whole heads and equal slices (`valid_world_sizes`). The message reads
    "this model{detail} cannot be split {into}; {fix}: 1, 2, ..."."""
    if n in valid_world_sizes(args, upto=max(n, 1), spec=spec):
        return
    good = ", ".join(map(str, valid_world_sizes(args, upto=16, spec=spec)))
    raise CheckpointError(f"this model{detail} cannot be split {into}; {fix}: {good}")


def md5_file(path: Path, block: int = 1 << 24) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stored_bytes(ckpt: Checkpoint) -> int:
    """Bytes of all the checkpoint's tensors, from their shapes and dtypes (nothing is read)."""
    return sum(math.prod(tensor_shape(shard, k)) * (_dtype_of(shard, k) or torch.float32).itemsize
               for shard in ckpt.shards for k in shard)


def save_checkpoint(shards: Iterable[StateDict], params: dict, out_dir, inputs: Sequence = (),
                    extra_files: Sequence[Tuple[Path, str]] = (), needed: Optional[int] = None) -> List[Path]:
    """Writes shards (each saved as it comes, so an iterator keeps one in memory), params.json,
    `extra_files` ((source, name) copies, e.g. tokenizer.model) and checklist.chk in Meta's
    layout into `out_dir`.

    Refuses, before writing anything, a folder that holds a checkpoint or is one of `inputs`,
    or a disk with less than `needed` bytes free (the shards' size, when the caller knows it).
    Each file appears under its final name only once whole; on failure (a full disk too)
    everything written is removed.
    """
    if needed is not None:
        needed += sum(Path(src).stat().st_size for src, _ in extra_files)
    out, created = files.prepare_output(out_dir, inputs, needed)
    written: List[Path] = []
    with files.output_transaction(out, created, needed):
        for i, shard in enumerate(shards):
            path = out / f"consolidated.{i:02d}.pth"
            size = sum(t.nbytes for t in shard.values())
            files.write_atomic(path, lambda tmp: torch.save(shard, tmp), needed=size)
            written.append(path)
            del shard
        files.write_text(out / "params.json", json.dumps(params))
        copies = [files.copy_file(src, out / name) for src, name in extra_files]
        lines = [f"{md5_file(p)}  {p.name}\n" for p in written + [out / "params.json"] + copies]
        files.write_text(out / "checklist.chk", "".join(lines))
    return written

