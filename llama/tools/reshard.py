"""Re-splits a Meta checkpoint for another model-parallel size, on disk.

    python -m llama.tools.reshard --ckpt_dir llama-2-70b --shards 2 --out llama-2-70b-mp2

Writes Meta's format (consolidated.NN.pth, params.json) and a checklist.chk of md5s for the
new files. Output shards are built one at a time from the memory-mapped input, so memory
use stays near one output shard. (Llama.build reshards at load time too; resharding on disk
saves that work at every start.)
"""

import argparse
import sys
import time

from llama import checkpoint as ck


def reshard_dir(ckpt_dir, shards: int, out_dir) -> list:
    """Writes `ckpt_dir`'s model as `shards` shards into `out_dir`; returns the written shard paths."""
    params = ck.load_params(ckpt_dir)
    paths = ck.shard_paths(ckpt_dir)
    sources = [ck.load_shard(p) for p in paths]
    ck.check_shards(paths, sources)
    whole = {k: t.shape[d] * len(sources) if (d := ck.split_dim(k)) is not None else None for k, t in sources[0].items()}
    bad = [k for k, n in whole.items() if n is not None and n % shards]
    if bad:
        raise ck.CheckpointError(f"cannot split {bad[0]} ({whole[bad[0]]} along its split dim) into {shards} equal shards")
    args = ck.model_args(ckpt_dir, vocab_size=sources[0]["output.weight"].shape[0] * len(sources))
    ck.check_split(args, shards, into=f"into {shards} shards (whole heads per shard)", fix="use one of")
    return ck.save_checkpoint((ck.shard_for_rank(sources, r, shards) for r in range(shards)), params, out_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_dir", required=True)
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    t0 = time.time()
    try:
        written = reshard_dir(a.ckpt_dir, a.shards, a.out)
    except ck.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} shard(s), params.json and checklist.chk to {a.out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
