"""Quantizes a Meta checkpoint's linear layers to int8 or int4, once, on disk.

    python -m llama.tools.quantize --ckpt_dir llama-2-13b --mode int4 --out llama-2-13b-int4

Writes Meta's layout (consolidated.NN.pth, params.json with a `quantization` entry,
checklist.chk) into a new or empty folder, in the format `llama.layout.stored_form`
describes; `Llama.build` and the example scripts load it as it is (no --quantize needed),
on any world size its shapes allow. Output shards (by default as many as the input has)
are built one at a time from the memory-mapped input, each weight quantized on the GPU
when there is one.
"""

import time
from typing import List, Optional

import torch

from llama import checkpoint as ck
from llama import quant
from llama.cli import Parser
from llama.config import choose_group, weight_bytes
from llama.distributed import run_main
from llama.layout import DEFAULT_GROUP, QuantSpec


def quantized_shard(src: ck.Checkpoint, rank: int, shards: int, spec: QuantSpec, device: torch.device) -> dict:
    """Output shard `rank` of `shards`: every tensor cut from the sources, linear weights quantized."""
    items = ((key, ck.rank_tensor(key, src.shards, rank, shards)) for key in src.shards[0])
    absmax = quant.whole_row_absmax(src.shards, shards, spec)
    # slices of the memory-mapped sources are copied; what was quantized on a GPU comes back
    return {k: t.clone() if t.device.type == "cpu" else t.cpu()
            for k, t in quant.quantize_items(items, spec, device, absmax)}


def quantize_dir(ckpt_dir, mode: str, out_dir, shards=None, group_size: int = DEFAULT_GROUP, device=None,
                 output_mode: str = "int8") -> list:
    """Writes `ckpt_dir`'s model with quantized linear layers into `out_dir` (the output head
    in `output_mode`); returns the shard paths."""
    if quant.check_mode(mode) is None:
        raise ValueError("--mode must be int8 or int4")
    if output_mode not in quant.MODES:
        raise ValueError(f"--output_mode must be int8 or int4, got {output_mode!r}")
    src = ck.open_checkpoint(ckpt_dir)
    if src.kind != "meta":
        raise ck.CheckpointError(f"{str(ckpt_dir)!r} is a Hugging Face folder: convert it to Meta's format first "
                                 "(python -m llama.tools.convert --to meta)")
    if src.spec is not None:
        raise ck.CheckpointError(f"{str(ckpt_dir)!r} is already quantized ({src.params['quantization']}): "
                                 "quantize the original bf16 checkpoint instead")
    args = src.args
    shards = shards or len(src.shards)
    group = choose_group(args.dim, args.ffn_hidden_dim, group_size, shards) if mode == "int4" else DEFAULT_GROUP
    spec = QuantSpec(mode, group, output_mode)
    ck.check_split(args, shards, spec, into=f"into {shards} shards ({mode})", fix="use --shards in")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    params = dict(src.params, quantization=spec.params())
    needed = weight_bytes(args, src.shards[0]["norm.weight"].dtype, spec)
    return ck.save_checkpoint((quantized_shard(src, r, shards, spec, device) for r in range(shards)), params,
                              out_dir, inputs=[ckpt_dir], needed=needed)


def parser() -> Parser:
    p = Parser(__doc__.split("\n\n")[0])
    p.add(("ckpt_dir",), ckpt_dir=dict(required=True, help="the Meta checkpoint to quantize (bf16 or fp16)"))
    p.add_argument("--mode", required=True, choices=quant.MODES, help="int8: per output channel; int4: per group")
    p.add(("out", "group_size", "device"), out=dict(required=True), group_size=dict(default=DEFAULT_GROUP),
          device=dict(help="where to quantize", unset="cuda when present"))
    p.add_argument("--shards", type=int, default=None, metavar="N", unset="as many as the input",
                   help="output shards")
    p.add_argument("--output_mode", default="int8", choices=quant.MODES,
                   help="the output head's format (int4: a smaller file, larger errors)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    t0 = time.time()
    with p.speaking_flags():
        written = quantize_dir(a.ckpt_dir, a.mode, a.out, a.shards, a.group_size, a.device, a.output_mode)
    print(f"wrote {len(written)} {a.mode} shard(s), params.json and checklist.chk to {a.out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
