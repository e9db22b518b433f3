"""Re-splits a Meta checkpoint for another model-parallel size, on disk.

    python -m llama.tools.reshard --ckpt_dir llama-2-70b --shards 2 --out llama-2-70b-mp2

Writes Meta's format (consolidated.NN.pth, params.json) and a checklist.chk of md5s for the
new files into a new or empty folder. Output shards are built one at a time from the
memory-mapped input, so memory use stays near one output shard. (Llama.build reshards at
load time too; resharding on disk saves that work at every start.)
"""

import time
from typing import List, Optional

from llama import checkpoint as ck
from llama.cli import Parser
from llama.distributed import run_main


def reshard_dir(ckpt_dir, shards: int, out_dir) -> list:
    """Writes `ckpt_dir`'s model as `shards` shards into `out_dir`; returns the written shard paths."""
    src = ck.open_checkpoint(ckpt_dir)
    if src.kind != "meta":
        raise ck.CheckpointError(f"{str(ckpt_dir)!r} is a Hugging Face folder: reshard converts Meta checkpoints "
                                 "(python -m llama.tools.convert --to meta --shards N makes one)")
    ck.check_split(src.args, shards, into=f"into {shards} shards (whole heads per shard)", fix="use one of")
    return ck.save_checkpoint((ck.shard_for_rank(src.shards, r, shards) for r in range(shards)), src.params, out_dir,
                              inputs=[ckpt_dir], needed=ck.stored_bytes(src))


def parser() -> Parser:
    p = Parser(__doc__.split("\n\n")[0])
    p.add(("ckpt_dir",), ckpt_dir=dict(required=True, help="the Meta checkpoint to re-split"))
    p.add_argument("--shards", type=int, required=True, metavar="N",
                   help="shards to write (the model-parallel size to run on)")
    p.add(("out",), out=dict(required=True))
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    t0 = time.time()
    with p.speaking_flags():
        written = reshard_dir(a.ckpt_dir, a.shards, a.out)
    print(f"wrote {len(written)} shard(s), params.json and checklist.chk to {a.out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
