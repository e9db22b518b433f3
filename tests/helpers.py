"""Helpers for the tests only: whole-checkpoint operations built from the library's pieces."""

from typing import List, Sequence

from llama import checkpoint as ck


def load_all(folder) -> List[dict]:
    return [ck.load_shard(p) for p in ck.shard_paths(folder)]


def reshard(shards: Sequence[dict], world_size: int) -> List[dict]:
    """N shards -> `world_size` shards, as fairscale would have split the merged model."""
    return [ck.shard_for_rank(shards, r, world_size) for r in range(world_size)]


def merge(shards: Sequence[dict]) -> dict:
    return ck.shard_for_rank(shards, 0, 1)


def rank_state(shards: Sequence[dict], rank: int, world_size: int) -> dict:
    """This rank's state (without the unused keys), cut from any shard count."""
    return {k: ck.rank_tensor(k, shards, rank, world_size) for k in shards[0] if k not in ck.UNUSED_KEYS}


def same_state(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def cli(main, *argv) -> int:
    """A command's exit status, run in this process as its __main__ would (errors in one line)."""
    from llama.distributed import report

    try:
        return report(lambda: main(list(argv)))
    except SystemExit as e:  # argparse
        return e.code
