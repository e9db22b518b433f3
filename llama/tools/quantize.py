"""Quantizes a Meta checkpoint's linear layers to int8 or int4, once, on disk.

    python -m llama.tools.quantize --ckpt_dir llama-2-13b --mode int4 --out llama-2-13b-int4

Writes Meta's layout (consolidated.NN.pth, params.json with a `quantization` entry,
checklist.chk) in the format `llama.quant` describes; `Llama.build` and the example
scripts load it as it is (no --quantize needed), on any world size its shapes allow.
Output shards (by default as many as the input has) are built one at a time from the
memory-mapped input, each weight quantized on the GPU when there is one.
"""

import argparse
import sys
import time

import torch

from llama import checkpoint as ck
from llama import quant


def quantized_shard(sources, rank: int, shards: int, spec: quant.Spec, device: torch.device) -> dict:
    """Output shard `rank` of `shards`: every tensor cut from the sources, linear weights quantized."""
    items = ((key, ck.rank_tensor(key, sources, rank, shards)) for key in sources[0])
    # slices of the memory-mapped sources are copied; what was quantized on a GPU comes back
    return {k: t.clone() if t.device.type == "cpu" else t.cpu()
            for k, t in quant.quantize_items(items, sources, shards, spec, device)}


def quantize_dir(ckpt_dir, mode: str, out_dir, shards=None, group_size: int = quant.DEFAULT_GROUP,
                 device=None) -> list:
    """Writes `ckpt_dir`'s model with quantized linear layers into `out_dir`; returns the shard paths."""
    quant.check_mode(mode)
    if mode is None:
        raise ValueError("--mode must be int8 or int4")
    params = ck.load_params(ckpt_dir)
    if params.get("quantization"):
        raise ck.CheckpointError(f"{str(ckpt_dir)!r} is already quantized ({params['quantization']}): "
                                 "quantize the original bf16 checkpoint instead")
    paths = ck.shard_paths(ckpt_dir)
    sources = [ck.load_shard(p) for p in paths]
    ck.check_shards(paths, sources)
    args = ck.model_args(ckpt_dir, vocab_size=sources[0]["output.weight"].shape[0] * len(sources))
    ck.check_against_params(args, sources, ckpt_dir)
    shards = shards or len(sources)
    group = quant.choose_group(args.dim, args.ffn_hidden_dim, group_size, shards) if mode == "int4" else quant.DEFAULT_GROUP
    spec = quant.Spec(mode, group)
    ck.check_split(args, shards, spec, into=f"into {shards} shards ({mode})", fix="use --shards in")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    params = dict(params, quantization=spec.params())
    return ck.save_checkpoint((quantized_shard(sources, r, shards, spec, device) for r in range(shards)), params, out_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_dir", required=True)
    p.add_argument("--mode", required=True, choices=quant.MODES)
    p.add_argument("--out", required=True)
    p.add_argument("--shards", type=int, default=None, help="output shards (default: as many as the input)")
    p.add_argument("--group_size", type=int, default=quant.DEFAULT_GROUP, help="int4: input columns per scale")
    p.add_argument("--device", default=None, help="where to quantize (default: cuda if present)")
    a = p.parse_args(argv)
    t0 = time.time()
    try:
        written = quantize_dir(a.ckpt_dir, a.mode, a.out, a.shards, a.group_size, a.device)
    except (ck.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} {a.mode} shard(s), params.json and checklist.chk to {a.out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
