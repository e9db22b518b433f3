"""Converts between Meta's checkpoint format and Hugging Face's.

    python -m llama.tools.convert --to hf --ckpt_dir llama-2-7b --tokenizer_path tokenizer.model --out llama-2-7b-hf
    python -m llama.tools.convert --to meta --ckpt_dir Atom-7B --out atom-7b-meta [--shards 2]

Hugging Face output: config.json (LlamaForCausalLM), safetensors (sharded with an index
above --max_shard_gb), and the tokenizer files. Meta output: consolidated.NN.pth,
params.json, checklist.chk and tokenizer.model. Tensors are converted one output file at
a time; a round trip gives back the same bits.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from llama import checkpoint as ck
from llama import hf

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": True,
}


def meta_to_hf(ckpt_dir, out_dir, tokenizer_path=None, max_shard_bytes: int = 5 << 30) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and any(out.glob("*.safetensors")):
        raise ck.CheckpointError(f"{str(out)!r} already holds a checkpoint; choose an empty folder")
    params = ck.load_params(ckpt_dir)
    if params.get("quantization"):
        raise ck.CheckpointError(f"{str(ckpt_dir)!r} is quantized ({params['quantization']}); convert the "
                                 "original bf16 checkpoint (Hugging Face's format here holds float weights)")
    paths = ck.shard_paths(ckpt_dir)
    shards = [ck.load_shard(p) for p in paths]
    ck.check_shards(paths, shards)
    vocab = ck.tensor_shape(shards[0], "output.weight")[0] * len(shards)
    keys = [k for k in shards[0] if k not in ck.UNUSED_KEYS]

    def nbytes(k):  # the whole tensor's size, from the shards' shapes
        n = shards[0][k].nbytes
        return n * len(shards) if ck.split_dim(k) is not None else n

    # Group keys into output files of at most max_shard_bytes.
    groups, size = [[]], 0
    for k in keys:
        n = nbytes(k)
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    out.mkdir(parents=True, exist_ok=True)
    weight_map, dtype = {}, None
    for i, group in enumerate(groups):
        name = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = hf.to_hf_state({k: ck.rank_tensor(k, shards, 0, 1) for k in group}, params)
        dtype = next(iter(tensors.values())).dtype
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
    if len(groups) > 1:
        total = sum(nbytes(k) for k in keys)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / hf.CONFIG).write_text(json.dumps(hf.hf_config(params, vocab, dtype), indent=2))
    if tokenizer_path:
        shutil.copy(tokenizer_path, out / "tokenizer.model")
        (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))


def hf_to_meta(ckpt_dir, out_dir, shards: int = 1) -> None:
    config = hf.read_config(ckpt_dir)
    state = hf.HFState(ckpt_dir, config)
    params = hf.meta_params(hf.params_from_config(config))
    ck.save_checkpoint((ck.shard_for_rank([state], r, shards) for r in range(shards)), params, out_dir)
    tokenizer = Path(ckpt_dir) / "tokenizer.model"
    if tokenizer.is_file():
        shutil.copy(tokenizer, Path(out_dir) / "tokenizer.model")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--to", required=True, choices=["hf", "meta"])
    p.add_argument("--ckpt_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer_path", default=None, help="--to hf: the tokenizer.model to ship with the model")
    p.add_argument("--shards", type=int, default=1, help="--to meta: model-parallel shards to write")
    p.add_argument("--max_shard_gb", type=float, default=5.0, help="--to hf: largest safetensors file")
    a = p.parse_args(argv)
    try:
        if a.to == "hf":
            if hf.is_hf_dir(a.ckpt_dir):
                raise ck.CheckpointError(f"{a.ckpt_dir!r} is already in Hugging Face format")
            meta_to_hf(a.ckpt_dir, a.out, a.tokenizer_path, int(a.max_shard_gb * (1 << 30)))
        else:
            if not hf.is_hf_dir(a.ckpt_dir):
                raise ck.CheckpointError(f"{a.ckpt_dir!r} is not a Hugging Face Llama folder (no config.json)")
            hf_to_meta(a.ckpt_dir, a.out, a.shards)
    except ck.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
