"""Meta's checkpoint format: params.json, consolidated.NN.pth shards, resharding.

A checkpoint of N shards loads on any world size M whose split dims divide: each
rank takes its slice of every tensor straight from the memory-mapped shards.
Resharding is pure functions over state dicts, with one table of split dims.
"""

import hashlib
import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from llama.model import ModelArgs

StateDict = Dict[str, torch.Tensor]

# How fairscale splits each weight across model-parallel ranks (absent: replicated).
SPLIT_DIMS = {
    "tok_embeddings": 1,  # ParallelEmbedding splits the embedding dim
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,  # ColumnParallelLinear
    "wo": 1, "w2": 1,  # RowParallelLinear
}

# Weights in Meta's files that the model does not use.
UNUSED_KEYS = ("rope.freqs",)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked; the message says why and what to do."""


def split_dim(key: str) -> Optional[int]:
    """The dim along which `key` is split across shards, or None if every shard holds all of it.

    A quantized weight's scales and zeros split with it (`llama.quant`), except an int8
    row-parallel layer's per-output-channel scale, which every shard holds whole.
    """
    parts = key.split(".")
    if len(parts) < 2:
        return None
    dim = SPLIT_DIMS.get(parts[-2])
    return None if parts[-1] == "weight_scale" and dim == 1 else dim


def _checkpoint_dir(ckpt_dir) -> Path:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(
            f"checkpoint directory {str(ckpt_dir)!r} does not exist; pass --ckpt_dir the folder "
            "download.sh made (e.g. llama-2-7b/), holding params.json and consolidated.*.pth"
        )
    return ckpt_dir


def shard_paths(ckpt_dir) -> List[Path]:
    """The checkpoint's shards in rank order (consolidated.00.pth, consolidated.01.pth, ...)."""
    ckpt_dir = _checkpoint_dir(ckpt_dir)
    paths = sorted(ckpt_dir.glob("*.pth"))
    if not paths:
        raise CheckpointError(
            f"no checkpoint files found in {str(ckpt_dir)!r}: expected Meta's consolidated.00.pth ... "
            "(run download.sh, or check the path), or a Hugging Face folder with config.json"
        )
    return paths


def load_params(ckpt_dir) -> dict:
    """The checkpoint's params.json as a dict."""
    path = _checkpoint_dir(ckpt_dir) / "params.json"
    if not path.is_file() and not any(path.parent.glob("*.pth")):
        raise CheckpointError(
            f"{str(path.parent)!r} is neither a Meta checkpoint (params.json and consolidated.*.pth) "
            "nor a Hugging Face Llama folder (config.json and its weights): check the path"
        )
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing: every Meta checkpoint folder has a params.json")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}); download it again") from None
    if not isinstance(params, dict):
        raise CheckpointError(f"{str(path)!r} should hold a JSON object of model sizes")
    return params


def model_args(ckpt_dir, **overrides) -> ModelArgs:
    """ModelArgs from the checkpoint's params.json (or a Hugging Face config.json), with
    `overrides` (max_seq_len, ...)."""
    from llama import hf

    params = hf.params_from_config(hf.read_config(ckpt_dir)) if hf.is_hf_dir(ckpt_dir) else load_params(ckpt_dir)
    from llama import quant

    try:
        args = ModelArgs.from_params(params, **overrides)
        quant.spec_from_params(args.quantization)
        return args
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"params.json in {str(ckpt_dir)!r} does not describe a Llama model: {e}") from None


def vocab_size(ckpt_dir, args: ModelArgs, tokenizer_words: int) -> int:
    """The model's vocabulary size: the tokenizer's, as the reference does; for a Hugging Face
    checkpoint its config's (the weights'), which the tokenizer must not exceed."""
    from llama import hf

    if not hf.is_hf_dir(ckpt_dir):
        return tokenizer_words
    if tokenizer_words > args.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer_words} pieces but the model only {args.vocab_size}: "
            f"use the tokenizer.model that came with {str(ckpt_dir)!r}"
        )
    if tokenizer_words < args.vocab_size:
        warnings.warn(f"the model has {args.vocab_size} token ids, the tokenizer {tokenizer_words}")
    return args.vocab_size


def load_shard(path: Path) -> StateDict:
    """One shard, memory-mapped: tensors are read from disk only when used."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as e:
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(
            f"cannot read shard {str(path)!r} ({size} bytes): it is truncated or corrupt ({e}). "
            "Download it again (download.sh resumes and checks md5)."
        ) from None


def _slice(full_len: int, world_size: int, rank: int, what: str):
    if full_len % world_size:
        raise CheckpointError(f"{what}: size {full_len} does not split into {world_size} equal parts")
    size = full_len // world_size
    return rank * size, size


def tensor_shape(shard, key: str) -> tuple:
    """A tensor's shape; lazy shards (Hugging Face checkpoints) tell it without reading the tensor."""
    return tuple(shard.shape_of(key)) if hasattr(shard, "shape_of") else tuple(shard[key].shape)


def rank_tensor(key: str, shards: Sequence[StateDict], rank: int, world_size: int) -> torch.Tensor:
    """`key`'s slice for `rank` of `world_size`, cut from the N source shards without merging them all."""
    dim = split_dim(key)
    if dim is None or world_size == len(shards):
        return shards[0][key] if dim is None else shards[rank][key]
    local = tensor_shape(shards[0], key)[dim]
    start, size = _slice(local * len(shards), world_size, rank, key)
    pieces = []
    for i, shard in enumerate(shards):  # shard i holds [i * local, (i + 1) * local)
        lo, hi = max(start, i * local), min(start + size, (i + 1) * local)
        if lo < hi:
            pieces.append(shard[key].narrow(dim, lo - i * local, hi - lo))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def merge_shards(shards: Sequence[StateDict]) -> StateDict:
    """The whole model's state dict from its model-parallel shards."""
    return {k: rank_tensor(k, shards, 0, 1) for k in shards[0]}


def reshard(shards: Sequence[StateDict], world_size: int) -> List[StateDict]:
    """N shards -> `world_size` shards, as fairscale would have split the merged model.

    The tensors are compact copies (a saved view would write its whole source storage).
    """
    return [shard_for_rank(shards, r, world_size) for r in range(world_size)]


def shard_for_rank(shards: Sequence[StateDict], rank: int, world_size: int) -> StateDict:
    """Rank `rank`'s whole shard of `world_size` (every key, `rope.freqs` too), as compact tensors."""
    return {k: rank_tensor(k, shards, rank, world_size).clone() for k in shards[0]}


def check_shards(paths: Sequence[Path], shards: Sequence[StateDict]) -> None:
    """Raises CheckpointError unless the shards hold the same keys and consistent shapes."""
    keys = set(shards[0])
    for path, shard in zip(paths[1:], shards[1:]):
        if set(shard) != keys:
            diff = sorted(keys.symmetric_difference(shard))[:5]
            raise CheckpointError(f"shard {path.name} holds other tensors than {paths[0].name}: {diff}")
        for k, t in shard.items():
            ref = shards[0][k]
            dim = split_dim(k)
            same = [d for d in range(ref.dim()) if d != dim]
            if t.dim() != ref.dim() or any(t.shape[d] != ref.shape[d] for d in same) or (
                dim is not None and t.shape[dim] != ref.shape[dim]
            ):
                raise CheckpointError(
                    f"shards do not match: {k} is {tuple(ref.shape)} in {paths[0].name} "
                    f"but {tuple(t.shape)} in {path.name}; the folder mixes files of different models"
                )


def valid_world_sizes(args: ModelArgs, upto: int = 64, spec=None) -> List[int]:
    """World sizes whose ranks each get whole heads and equal slices of every split weight
    (and, for int4 weights, whole groups: `spec`, or the checkpoint's own quantization)."""
    from llama import quant

    sizes = (args.n_heads, args.kv_heads, args.dim, args.ffn_hidden_dim)
    if args.vocab_size > 0:
        sizes += (args.vocab_size,)
    spec = spec or quant.spec_from_params(args.quantization)
    if spec is not None and spec.mode == "int4":
        sizes += (args.dim // spec.group, args.ffn_hidden_dim // spec.group)
    return [m for m in range(1, upto + 1) if all(s % m == 0 for s in sizes)]


def check_split(args: ModelArgs, n: int, spec=None, *, detail: str = "", into: str, fix: str) -> None:
    """Raises CheckpointError, listing the sizes that work, unless `n` ranks or shards each get
    whole heads and equal slices (`valid_world_sizes`). The message reads
    "this model{detail} cannot be split {into}; {fix}: 1, 2, ..."."""
    if n in valid_world_sizes(args, upto=max(n, 1), spec=spec):
        return
    good = ", ".join(map(str, valid_world_sizes(args, upto=16, spec=spec)))
    raise CheckpointError(f"this model{detail} cannot be split {into}; {fix}: {good}")


def expected_shapes(args: ModelArgs) -> Dict[str, tuple]:
    """The whole (unsharded) shape of every weight the model needs."""
    d, hd, h = args.dim, args.head_dim, args.ffn_hidden_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,), "output.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, d),
            p + "attention.wk.weight": (args.kv_heads * hd, d),
            p + "attention.wv.weight": (args.kv_heads * hd, d),
            p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (h, d),
            p + "feed_forward.w2.weight": (d, h),
            p + "feed_forward.w3.weight": (h, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
    return shapes


def stored_shapes(args: ModelArgs) -> Dict[str, tuple]:
    """{key: (shape, dtype or None)} of the tensors a checkpoint of `args` holds: the float
    weights, or for a quantized checkpoint (params.json `quantization`) their quantized form."""
    from llama import quant

    spec = quant.spec_from_params(args.quantization)
    out = {}
    for key, shape in expected_shapes(args).items():
        if spec is not None and quant.is_quantized_layer(key):
            out.update(quant.stored_shapes(key, shape, spec))
        else:
            out[key] = (shape, None)
    return out


def check_against_params(args: ModelArgs, shards: Sequence[StateDict], ckpt_dir) -> None:
    """Raises CheckpointError if the weights are not the shapes params.json (and the tokenizer) imply."""
    stored = stored_shapes(args)
    expected = {k: shape for k, (shape, _) in stored.items()}
    missing = sorted(set(expected) - set(shards[0]))
    if missing:
        raise CheckpointError(
            f"the shards in {str(ckpt_dir)!r} lack {len(missing)} weight(s) the model needs, "
            f"e.g. {missing[:3]}: params.json says n_layers={args.n_layers}; is this a Llama checkpoint?"
        )
    n = len(shards)
    for key, shape in expected.items():
        local = tensor_shape(shards[0], key)
        dim = split_dim(key)
        whole = tuple(s * n if d == dim else s for d, s in enumerate(local))
        if whole != shape:
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
        dtype = stored[key][1]
        if dtype is not None and _dtype_of(shards[0], key) not in (None, dtype):
            raise CheckpointError(
                f"{key} is {_dtype_of(shards[0], key)} but params.json says the weights are quantized "
                f"({args.quantization}), which stores it as {dtype}: the files and params.json do not belong together"
            )


def _dtype_of(shard, key: str) -> Optional[torch.dtype]:
    return None if hasattr(shard, "shape_of") else shard[key].dtype


def open_checkpoint(ckpt_dir, args: ModelArgs, world_size: int, spec=None):
    """Opens and checks every shard (memory-mapped) for loading on `world_size` ranks
    (quantized to `spec` while loading, if given).

    A Hugging Face folder opens as one whole shard, converted to Meta's layout lazily.
    """
    from llama import hf

    if hf.is_hf_dir(ckpt_dir):
        paths, shards = [Path(ckpt_dir) / hf.CONFIG], [hf.HFState(ckpt_dir, hf.read_config(ckpt_dir))]
    else:
        paths = shard_paths(ckpt_dir)
        shards = [load_shard(p) for p in paths]
    check_shards(paths, shards)
    check_against_params(args, shards, ckpt_dir)
    groups = f", int4 groups of {spec.group}" if spec is not None and spec.mode == "int4" else ""
    check_split(args, world_size, spec,
                detail=f" ({len(paths)} shard(s), n_heads={args.n_heads}, n_kv_heads={args.kv_heads}{groups})",
                into=f"over {world_size} processes", fix="it runs with --nproc_per_node in")
    return paths, shards


def rank_state(shards: Sequence[StateDict], rank: int, world_size: int) -> StateDict:
    """This rank's state dict (without the unused keys), resharding from any shard count."""
    return dict(iter_rank_state(shards, rank, world_size))


def iter_rank_state(shards: Sequence[StateDict], rank: int, world_size: int):
    """(key, tensor) pairs of this rank's state, each cut from the shards only when asked for."""
    for k in shards[0]:
        if k not in UNUSED_KEYS:
            yield k, rank_tensor(k, shards, rank, world_size)


def save_checkpoint(shards: Iterable[StateDict], params: dict, out_dir) -> List[Path]:
    """Writes shards (each saved as it comes, so an iterator keeps one in memory), params.json
    and checklist.chk in Meta's layout; refuses to overwrite an existing checkpoint.

    Each file appears under its final name only once it is whole.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.glob("*.pth")):
        raise CheckpointError(f"{str(out_dir)!r} already holds a checkpoint; choose an empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, shard in enumerate(shards):
        path = out_dir / f"consolidated.{i:02d}.pth"
        tmp = path.with_suffix(".pth.tmp")
        torch.save(shard, tmp)
        os.replace(tmp, path)
        written.append(path)
        del shard
    (out_dir / "params.json").write_text(json.dumps(params))
    lines = [f"{md5_file(p)}  {p.name}\n" for p in written + [out_dir / "params.json"]]
    (out_dir / "checklist.chk").write_text("".join(lines))
    return written


def md5_file(path: Path, block: int = 1 << 24) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()
