"""Converts between Meta's checkpoint format and Hugging Face's.

    python -m llama.tools.convert --to hf --ckpt_dir llama-2-7b --tokenizer_path tokenizer.model --out llama-2-7b-hf
    python -m llama.tools.convert --to meta --ckpt_dir Atom-7B --out atom-7b-meta [--shards 2]

Hugging Face output: config.json (LlamaForCausalLM), safetensors (sharded with an index
above --max_shard_gb), and the tokenizer files. Meta output: consolidated.NN.pth,
params.json (only the keys Meta's own code reads), checklist.chk and tokenizer.model.
Either goes into a new or empty folder. Tensors are converted one output file at a time;
a round trip gives back the same bits (and the same params.json).
"""

import json
from pathlib import Path
from typing import List, Optional

from llama import checkpoint as ck
from llama import files, hf
from llama.extras import needs
from llama.cli import Parser
from llama.distributed import run_main

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": True,
}


def _save_file():
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ck.CheckpointError(needs("writing Hugging Face files", "hf")) from None
    return save_file


def meta_to_hf(ckpt_dir, out_dir, tokenizer_path=None, max_shard_bytes: int = 5 << 30) -> None:
    save_file = _save_file()
    src = ck.open_checkpoint(ckpt_dir)
    if src.kind != "meta":
        raise ck.CheckpointError(f"{str(ckpt_dir)!r} is already in Hugging Face format")
    if src.spec is not None:
        raise ck.CheckpointError(f"{str(ckpt_dir)!r} is quantized ({src.params['quantization']}); convert the "
                                 "original bf16 checkpoint (Hugging Face's format here holds float weights)")
    shards = src.shards
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
    needed = ck.stored_bytes(src) + (Path(tokenizer_path).stat().st_size if tokenizer_path else 0)
    out, created = files.prepare_output(out_dir, [ckpt_dir], needed)
    with files.output_transaction(out, created, needed):
        weight_map, dtype = {}, None
        for i, group in enumerate(groups):
            name = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            tensors = hf.to_hf_state({k: ck.rank_tensor(k, shards, 0, 1) for k in group}, src.params)
            dtype = next(iter(tensors.values())).dtype
            files.write_atomic(out / name, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}),
                               needed=sum(t.nbytes for t in tensors.values()))
            weight_map.update({k: name for k in tensors})
            del tensors
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(nbytes(k) for k in keys)}, "weight_map": weight_map}
            files.write_text(out / "model.safetensors.index.json", json.dumps(index, indent=2))
        files.write_text(out / hf.CONFIG, json.dumps(hf.hf_config(src.params, src.args.vocab_size, dtype), indent=2))
        if tokenizer_path:
            files.copy_file(tokenizer_path, out / "tokenizer.model")
            files.write_text(out / "tokenizer_config.json", json.dumps(TOKENIZER_CONFIG, indent=2))


def hf_to_meta(ckpt_dir, out_dir, shards: int = 1) -> None:
    src = ck.open_checkpoint(ckpt_dir)
    if src.kind != "hf":
        raise ck.CheckpointError(f"{str(ckpt_dir)!r} is not a Hugging Face Llama folder (no config.json)")
    params = hf.meta_params_of(hf.read_config(ckpt_dir))
    ck.check_split(src.args, shards, into=f"into {shards} shards (whole heads per shard)", fix="use --shards in")
    tokenizer = Path(ckpt_dir) / "tokenizer.model"
    extra = [(tokenizer, "tokenizer.model")] if tokenizer.is_file() else []
    ck.save_checkpoint((ck.shard_for_rank(src.shards, r, shards) for r in range(shards)), params, out_dir,
                       inputs=[ckpt_dir], extra_files=extra, needed=ck.stored_bytes(src))


def parser() -> Parser:
    p = Parser(__doc__.split("\n\n")[0])
    p.add_argument("--to", required=True, choices=["hf", "meta"], help="the format to write")
    p.add(("ckpt_dir", "out"), ckpt_dir=dict(required=True, help="the checkpoint to convert"), out=dict(required=True))
    p.add_argument("--tokenizer_path", default=None, metavar="FILE",
                   help="--to hf: the tokenizer.model to ship with the model")
    p.add_argument("--shards", type=int, default=1, metavar="N", help="--to meta: model-parallel shards to write")
    p.add_argument("--max_shard_gb", type=float, default=5.0, metavar="GB", help="--to hf: largest safetensors file")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    with p.speaking_flags():
        if a.to == "hf":
            meta_to_hf(a.ckpt_dir, a.out, a.tokenizer_path, int(a.max_shard_gb * (1 << 30)))
        else:
            hf_to_meta(a.ckpt_dir, a.out, a.shards)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
