"""Writes a random Llama checkpoint in Meta's exact on-disk format.

    python -m llama.tools.random_checkpoint --dim 64 --n_layers 2 --n_heads 4 --n_kv_heads 2 --shards 2 OUT/

Weights are seeded random bfloat16 (by default), sharded as fairscale splits them,
with params.json (vocab_size -1, as Meta's) and the unused rope.freqs key. For tests,
benchmarks and checking an install before real weights arrive.
"""

import math
from typing import Optional

import torch

from llama.checkpoint import save_checkpoint, shard_for_rank
from llama.cli import Parser
from llama.config import ModelArgs, expected_shapes, weight_bytes
from llama.distributed import run_main
from llama.model import precompute_freqs_cis


def random_tensor(key: str, shape, gen: torch.Generator, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """A random weight for `key`, scaled so activations keep unit size through the layers."""
    if key.endswith("norm.weight"):
        return (1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)).to(dtype)
    fan_in = shape[1] if key != "tok_embeddings.weight" else 1
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32 if device == "cpu" else dtype)
    return t.div_(math.sqrt(fan_in)).to(dtype)


def random_state(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    """A whole random state dict for `args` (vocab_size must be set), with Meta's keys."""
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {key: random_tensor(key, shape, gen, dtype, device) for key, shape in expected_shapes(args).items()}
    # Meta's files carry the RoPE frequencies; the model recomputes them.
    state["rope.freqs"] = precompute_freqs_cis(args.head_dim, 2).angle()[1].to(dtype)
    return state


def write_random_checkpoint(out_dir, params: dict, vocab_size: int = 32000, shards: int = 1,
                            seed: int = 0, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    """Writes `shards` consolidated.NN.pth files and params.json to `out_dir`; returns the paths.

    device: where the random numbers are made ('cuda' is much faster for real sizes; the
    weights differ from the CPU's for the same seed)."""
    args = ModelArgs.from_params(params, vocab_size=vocab_size)

    def parts():  # made once the output folder is checked (a full disk is told before any work)
        whole = random_state(args, seed=seed, dtype=dtype, device=device)
        for r in range(shards):
            yield {k: v.cpu() for k, v in shard_for_rank([whole], r, shards).items()}

    return save_checkpoint(parts(), params, out_dir, needed=weight_bytes(args, dtype))


def parser() -> Parser:
    p = Parser(__doc__.split("\n\n")[0])
    p.add_argument("out_dir", metavar="OUT", help="the folder to write (new or empty)")
    p.add_argument("--dim", type=int, default=64, metavar="N", help="model width")
    p.add_argument("--n_layers", type=int, default=2, metavar="N", help="transformer blocks")
    p.add_argument("--n_heads", type=int, default=4, metavar="N", help="attention heads")
    p.add_argument("--n_kv_heads", type=int, default=None, metavar="N", unset="n_heads", help="key/value heads")
    p.add_argument("--multiple_of", type=int, default=32, metavar="N",
                   help="the feed-forward size is rounded up to a multiple of this")
    p.add_argument("--ffn_dim_multiplier", type=float, default=None, metavar="X", unset="none",
                   help="scales the feed-forward size (70B: 1.3)")
    p.add_argument("--norm_eps", type=float, default=1e-5, metavar="EPS", help="RMSNorm epsilon")
    p.add_argument("--rope_theta", type=float, default=None, metavar="THETA", unset="10000, not written",
                   help="RoPE base, written only when given (Code Llama style)")
    p.add_argument("--vocab_size", type=int, default=32000, metavar="N", help="rows of the embedding (params.json keeps -1)")
    p.add_argument("--shards", type=int, default=1, metavar="N", help="model-parallel shards to write")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random weights")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="weights dtype")
    p.add_argument("--device", default="cpu", metavar="NAME",
                   help="where to make the random numbers (cuda: faster for big models)")
    return p


def main(argv: Optional[list] = None) -> None:
    p = parser()
    a = p.parse_args(argv)
    params = {"dim": a.dim, "multiple_of": a.multiple_of, "n_heads": a.n_heads, "n_layers": a.n_layers,
              "norm_eps": a.norm_eps, "vocab_size": -1}
    if a.n_kv_heads is not None:
        params["n_kv_heads"] = a.n_kv_heads
    if a.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = a.ffn_dim_multiplier
    if a.rope_theta is not None:
        params["rope_theta"] = a.rope_theta
    with p.speaking_flags():
        paths = write_random_checkpoint(a.out_dir, params, a.vocab_size, a.shards, a.seed, getattr(torch, a.dtype),
                                        a.device)
    print(f"wrote {len(paths)} shard(s), params.json and checklist.chk to {a.out_dir}")


if __name__ == "__main__":
    run_main(main)
