"""Checks a checkpoint folder before you run it.

    python -m llama.tools.check --ckpt_dir llama-2-13b [--tokenizer_path tokenizer.model] [--no-md5]

Reports the model it recognises, shards and shapes, missing, truncated or damaged files,
weights that are not finite numbers, md5s against checklist.chk, the world sizes it can
run on and the memory each process needs. It checks what `Llama.build` would trip on,
with the same routine, and only reads regular files inside the folder. Exits 1 if it
found a problem.
"""

import re
import sys
from pathlib import Path
from typing import List, Optional

import torch

from llama import checkpoint as ck
from llama import files
from llama.build import check_tokenizer
from llama.cli import Parser
from llama.config import ModelArgs, choose_group, kv_cache_bytes, weight_bytes
from llama.distributed import run_main
from llama.layout import QUANT_MODES, QuantSpec
from llama.memory import GiB
from llama.tokenizer import Tokenizer

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


def check_md5(folder: Path, shards: List[Path], problems: List[str]) -> None:
    """md5 of each file checklist.chk lists, which must all be regular files inside the folder
    and must include every shard."""
    checklist = folder / "checklist.chk"
    if not checklist.exists():
        print("checklist.chk: absent (md5 not checked)")
        return
    if not files.regular_file(checklist) or files.inside(folder, "checklist.chk") is None:
        problems.append("checklist.chk is not a regular file of the folder: download it again")
        return
    text = checklist.read_text(errors="replace")
    entries = re.findall(r"^([0-9a-f]{32}) [ *]?(\S+)$", text, flags=re.M)
    if not entries or "<html" in text.lower():
        problems.append("checklist.chk is not an md5 checklist (an HTML page?): download it again")
        return
    listed = {name for _, name in entries}
    for path in shards:
        if path.name not in listed:
            problems.append(f"{path.name} is not listed in checklist.chk, so it cannot be verified: download "
                            "checklist.chk again")
    for want, name in entries:
        path = files.inside(folder, name)
        if path is None:
            problems.append(f"checklist.chk lists {name!r}, outside the folder (or a link out of it): not read; "
                            "download checklist.chk again")
            continue
        if not path.exists():
            problems.append(f"{name}: listed in checklist.chk but missing: download it again")
            continue
        if not files.regular_file(path):
            problems.append(f"{name}: not a regular file (a pipe or device?): not read; replace it with the download")
            continue
        got = ck.md5_file(path)
        print(f"md5 {name}: {'OK' if got == want else 'MISMATCH'}")
        if got != want:
            problems.append(f"{name}: md5 {got} but checklist.chk says {want}: download it again")


def check_finite(ckpt: ck.Checkpoint, problems: List[str]) -> None:
    """Every float weight is finite (NaN or inf give garbage, not an error, once loaded)."""
    for i, shard in enumerate(ckpt.shards):
        for key in shard:
            t = shard[key]
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                where = ckpt.paths[i].name if ckpt.kind == "meta" else "the weights"
                problems.append(f"{key} in {where} holds NaN or infinite values: the file is damaged; download it "
                                "again")


def memory_table(args: ModelArgs, sizes: List[int]) -> None:
    """GiB per process for each world size: this checkpoint's own quantization, or 16 and 32
    bit and the quantized modes Llama.build(quantize=...) offers."""
    print("memory per process (weights + KV cache for 1 sequence of 4096 tokens):")
    saved = args.quant_spec
    rows = [(torch.bfloat16, saved.mode, saved)] if saved else [(torch.bfloat16, "bf16/fp16", None),
                                                                (torch.float32, "float32", None)]
    if not saved:
        rows += [(torch.bfloat16, f"{mode} (--quantize {mode})", mode) for mode in QUANT_MODES]
    for dtype, name, spec in rows:
        cache = kv_cache_bytes(args, dtype, 1, 4096)
        cells = []
        for m in sizes:
            spec_m = spec
            if isinstance(spec, str):  # quantized while loading: int4 groups fit to m processes
                spec_m = QuantSpec(spec, choose_group(args.dim, args.ffn_hidden_dim, world_size=m))
            if spec_m is not None and m not in ck.valid_world_sizes(args, upto=m, spec=spec_m):
                continue
            cells.append(f"{m} proc: {(weight_bytes(args, dtype, spec_m, m) + cache / m) / GiB:.2f} GiB")
        print(f"  {name}: " + ", ".join(cells))


def check(ckpt_dir, tokenizer_path: Optional[str] = None, md5: bool = True) -> List[str]:
    """Prints a report on `ckpt_dir`; returns the problems found (empty: ready to run)."""
    folder = Path(ckpt_dir)
    problems: List[str] = []
    tokenizer = None
    if tokenizer_path is None and (folder / "tokenizer.model").exists():
        tokenizer_path = str(folder / "tokenizer.model")  # the one shipped in the folder
    if tokenizer_path:
        try:
            tokenizer = Tokenizer(tokenizer_path)
            print(f"tokenizer: {tokenizer.n_words} pieces")
        except (FileNotFoundError, ValueError) as e:
            problems.append(str(e))
    try:
        ckpt = ck.open_checkpoint(folder, vocab_size=tokenizer and tokenizer.n_words)
        if tokenizer is not None:
            check_tokenizer(ckpt, tokenizer)
    except ck.CheckpointError as e:
        problems.insert(0, str(e))
        if md5 and folder.is_dir() and not (folder / "config.json").exists():
            check_md5(folder, sorted(p for p in folder.glob("*.pth")), problems)
        return problems
    args = ckpt.args
    if ckpt.kind == "hf":
        names = sorted({p.name for p in ckpt.shards[0].files.values()})
        print(f"{folder}: Hugging Face LlamaForCausalLM, dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads "
              f"({args.kv_heads} kv), FFN {args.ffn_hidden_dim}, vocab {args.vocab_size}, rope_theta {args.rope_theta}")
        print(f"weights: {len(names)} file(s): {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}")
    else:
        quantized = f", quantized {ckpt.params['quantization']}" if ckpt.spec else ""
        print(f"{folder}: {recognise(ckpt.params)}{quantized}; params.json {ckpt.params}")
        for p, shard in zip(ckpt.paths, ckpt.shards):
            print(f"{p.name}: {p.stat().st_size / GiB:.2f} GiB, {len(shard)} tensors")
        emb = ckpt.shards[0]["tok_embeddings.weight"]
        print(f"shards: {len(ckpt.shards)}, dtype {str(emb.dtype).replace('torch.', '')}, "
              f"tok_embeddings per shard {tuple(emb.shape)}, vocab {args.vocab_size}")
    check_finite(ckpt, problems)
    sizes = ck.valid_world_sizes(args, upto=16)
    print(f"runs with --nproc_per_node (any of): {', '.join(map(str, sizes))}")
    memory_table(args, [m for m in sizes if m <= 8])
    if md5 and ckpt.kind == "meta":
        check_md5(folder, ckpt.paths, problems)
    return problems


def parser() -> Parser:
    p = Parser(__doc__.split("\n\n")[0])
    p.add_argument("folder", nargs="?", default=None, metavar="FOLDER", help="the checkpoint folder (or give --ckpt_dir)")
    p.add(("ckpt_dir",))
    p.add_argument("--tokenizer_path", default=None, metavar="FILE",
                   help="also check this tokenizer.model against the weights")
    p.add_argument("--no-md5", dest="md5", action="store_false", help="skip the md5 check (slow for big models)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    folder = a.ckpt_dir or a.folder
    if folder is None or (a.ckpt_dir and a.folder and a.ckpt_dir != a.folder):
        p.error("give the checkpoint folder once: --ckpt_dir FOLDER (or FOLDER alone)")
    with p.speaking_flags():
        problems = check(folder, a.tokenizer_path, a.md5)
    if problems:
        print("\nPROBLEMS:", file=sys.stderr)
        for prob in problems:
            print(f"- {p.to_flags(prob)}", file=sys.stderr)
        return 1
    print("\nOK: ready to run")
    return 0


if __name__ == "__main__":
    run_main(main)
