"""Checks a checkpoint folder before you run it.

    python -m llama.tools.check llama-2-13b [--tokenizer_path tokenizer.model] [--no-md5]

Reports the model it recognises, shards and shapes, missing or truncated files, md5s
against checklist.chk (and a checklist that is really an HTML page), the world sizes it
can run on and the memory each process needs. Exits 1 if it found a problem.
"""

import argparse
import re
import sys
from pathlib import Path
from typing import List, Optional

import torch

from llama import checkpoint as ck
from llama import hf, quant
from llama.memory import GiB, kv_cache_bytes, param_count
from llama.model import ModelArgs

# (family, size) by params.json values; Llama 1 and 2 differ at 7B/13B only in norm_eps.
KNOWN = [
    ("Llama 2", "7B", dict(dim=4096, n_layers=32, norm_eps=1e-5)),
    ("Llama 2", "13B", dict(dim=5120, n_layers=40, norm_eps=1e-5)),
    ("Llama 2", "70B", dict(dim=8192, n_layers=80, n_kv_heads=8)),
    ("Llama 1", "7B", dict(dim=4096, n_layers=32, norm_eps=1e-6)),
    ("Llama 1", "13B", dict(dim=5120, n_layers=40, norm_eps=1e-6)),
    ("Llama 1", "33B", dict(dim=6656, n_layers=60)),
    ("Llama 1", "65B", dict(dim=8192, n_layers=80, n_kv_heads=None)),
]


def recognise(params: dict) -> str:
    for family, size, want in KNOWN:
        if all(params.get(k) == v for k, v in want.items()):
            if params.get("rope_theta", 10000.0) != 10000.0 or params.get("vocab_size", -1) == 32016:
                family = "Code Llama"
            return f"{family} {size}"
    return f"unrecognised size (dim {params.get('dim')}, {params.get('n_layers')} layers)"


def check_md5(ckpt_dir: Path, problems: List[str]) -> None:
    checklist = ckpt_dir / "checklist.chk"
    if not checklist.exists():
        print("checklist.chk: absent (md5 not checked)")
        return
    text = checklist.read_text(errors="replace")
    entries = re.findall(r"^([0-9a-f]{32}) [ *]?(\S+)$", text, flags=re.M)
    if not entries or "<html" in text.lower():
        problems.append("checklist.chk is not an md5 checklist (an HTML page?): download it again")
        return
    for want, name in entries:
        path = ckpt_dir / name
        if not path.exists():
            problems.append(f"{name}: listed in checklist.chk but missing")
            continue
        got = ck.md5_file(path)
        print(f"md5 {name}: {'OK' if got == want else 'MISMATCH'}")
        if got != want:
            problems.append(f"{name}: md5 {got} but checklist.chk says {want}: download it again")


def memory_table(args: ModelArgs, sizes: List[int]) -> None:
    """GiB per process for each world size: this checkpoint's own quantization, or 16 and 32
    bit and the quantized modes Llama.build(quantize=...) offers."""
    print("memory per process (weights + KV cache for 1 sequence of 4096 tokens):")
    saved = quant.spec_from_params(args.quantization)
    rows = [(torch.bfloat16, saved.mode, saved)] if saved else [(torch.bfloat16, "bf16/fp16", None), (torch.float32, "float32", None)]
    if not saved:
        rows += [(torch.bfloat16, f"{mode} (--quantize {mode})", mode) for mode in quant.MODES]
    for dtype, name, spec in rows:
        cache = kv_cache_bytes(args, dtype, 1, 4096)
        cells = []
        for m in sizes:
            if spec is None:
                weights = param_count(args) * torch.empty((), dtype=dtype).element_size() / m
            else:
                if isinstance(spec, str):  # quantized while loading: int4 groups fit to m processes
                    spec_m = quant.Spec(spec, quant.choose_group(args.dim, args.ffn_hidden_dim, world_size=m))
                else:
                    spec_m = spec
                if m not in ck.valid_world_sizes(args, upto=m, spec=spec_m):
                    continue
                weights = quant.model_bytes(args, spec_m, dtype, m)
            cells.append(f"{m} proc: {(weights + cache / m) / GiB:.2f} GiB")
        print(f"  {name}: " + ", ".join(cells))


def check(ckpt_dir, tokenizer_path: Optional[str] = None, md5: bool = True) -> List[str]:
    """Prints a report on `ckpt_dir`; returns the problems found (empty: ready to run)."""
    ckpt_dir = Path(ckpt_dir)
    if hf.is_hf_dir(ckpt_dir):
        return check_hf(ckpt_dir)
    problems: List[str] = []
    try:
        params = ck.load_params(ckpt_dir)
        paths = ck.shard_paths(ckpt_dir)
    except ck.CheckpointError as e:
        return [str(e)]
    quantized = f", quantized {params['quantization']}" if params.get("quantization") else ""
    print(f"{ckpt_dir}: {recognise(params)}{quantized}; params.json {params}")
    shards = []
    for p in paths:
        try:
            shards.append(ck.load_shard(p))
            print(f"{p.name}: {p.stat().st_size / GiB:.2f} GiB, {len(shards[-1])} tensors")
        except ck.CheckpointError as e:
            problems.append(str(e))
    vocab = None
    if tokenizer_path:
        from llama.tokenizer import Tokenizer

        try:
            vocab = Tokenizer(tokenizer_path).n_words
            print(f"tokenizer: {vocab} pieces")
        except (FileNotFoundError, ValueError) as e:
            problems.append(str(e))
    if shards and len(shards) == len(paths):
        try:
            ck.check_shards(paths, shards)
            vocab = vocab or shards[0]["output.weight"].shape[0] * len(shards)
            args = ck.model_args(ckpt_dir, vocab_size=vocab)
            ck.check_against_params(args, shards, ckpt_dir)
            emb = shards[0]["tok_embeddings.weight"]
            print(f"shards: {len(shards)}, dtype {str(emb.dtype).replace('torch.', '')}, "
                  f"tok_embeddings per shard {tuple(emb.shape)}, vocab {vocab}")
            sizes = ck.valid_world_sizes(args, upto=16)
            print(f"runs with --nproc_per_node (any of): {', '.join(map(str, sizes))}")
            memory_table(args, [m for m in sizes if m <= 8])
        except ck.CheckpointError as e:
            problems.append(str(e))
    if md5:
        check_md5(ckpt_dir, problems)
    return problems


def check_hf(ckpt_dir: Path) -> List[str]:
    """The report for a Hugging Face Llama folder."""
    try:
        args = ck.model_args(ckpt_dir)
        paths, shards = ck.open_checkpoint(ckpt_dir, args, 1)
    except ck.CheckpointError as e:
        return [str(e)]
    files = sorted({p.name for p in shards[0].files.values()})
    print(f"{ckpt_dir}: Hugging Face LlamaForCausalLM, dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads "
          f"({args.kv_heads} kv), FFN {args.ffn_hidden_dim}, vocab {args.vocab_size}, rope_theta {args.rope_theta}")
    print(f"weights: {len(files)} file(s): {', '.join(files[:4])}{' ...' if len(files) > 4 else ''}")
    sizes = ck.valid_world_sizes(args, upto=16)
    print(f"runs with --nproc_per_node (any of): {', '.join(map(str, sizes))}")
    memory_table(args, [m for m in sizes if m <= 8])
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt_dir")
    p.add_argument("--tokenizer_path", default=None)
    p.add_argument("--no-md5", dest="md5", action="store_false", help="skip the md5 check (slow for big models)")
    a = p.parse_args(argv)
    problems = check(a.ckpt_dir, a.tokenizer_path, a.md5)
    if problems:
        print("\nPROBLEMS:", file=sys.stderr)
        for prob in problems:
            print(f"- {prob}", file=sys.stderr)
        return 1
    print("\nOK: ready to run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
