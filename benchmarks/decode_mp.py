"""Decode speed under model parallel: run with torchrun, one process per GPU (NCCL).

    torchrun --nproc_per_node 2 benchmarks/decode_mp.py --model 13B [--batch_sizes 1,32]
    torchrun --nproc_per_node 1 benchmarks/decode_mp.py --model 13B

Each rank holds its slice of random bf16 weights of the real shape (fairscale's layers, as
`Llama.build` makes them). Paths, each on the same weights: the faithful forward (the
reference's computation), the fast path eager, with CUDA graphs, and with CUDA graphs and
torch.compile (the default); `--paths` picks some (the faithful one first). A path that fails to
build or run under this world size is reported with its error. Prints decode tokens/s
(prompt 16, 128 new tokens, greedy), % of the bandwidth limit of all the GPUs together at
batch 1, the 2000-token prefill time, and the greedy agreement of each fast path with the
faithful one (teacher forcing, 240 positions).
"""

import argparse
import json
import traceback

import torch
import torch.distributed as dist
from decode import PREFILL_LEN, PROMPT_LEN, SHAPES, copy_bandwidth, decode_rates, no_eos, prefill_seconds, random_model

from llama import Llama, ModelArgs
from llama.distributed import choose_device, init_model_parallel, is_rank_zero, shutdown
from llama.fast import FaithfulDecoder, FastDecoder
from llama.fast.agreement import greedy_agreement
from llama.memory import param_count
from llama.tokenizer import Tokenizer

PATHS = {
    "faithful (reference forward)": lambda m: FaithfulDecoder(m),
    "fast, eager": lambda m: FastDecoder(m, compile=False, cuda_graphs=False),
    "fast, CUDA graphs": lambda m: FastDecoder(m, compile=False, cuda_graphs=True),
    "fast, CUDA graphs + compile (the default)": lambda m: FastDecoder(m, compile=True, cuda_graphs=True),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="13B", choices=list(SHAPES))
    p.add_argument("--batch_sizes", default="1,32")
    p.add_argument("--tokenizer", default="tests/fixtures/tokenizer.model")
    p.add_argument("--json", default=None)
    p.add_argument("--paths", default="", help="comma-separated parts of path names to run (default: all)")
    a = p.parse_args()
    batch_sizes = [int(x) for x in a.batch_sizes.split(",")]
    device = choose_device(None)
    rank, world = init_model_parallel(None, device)
    torch.manual_seed(1)
    tokenizer = no_eos(Tokenizer(a.tokenizer))
    bandwidth = copy_bandwidth() * world
    args = ModelArgs(**SHAPES[a.model], vocab_size=tokenizer.n_words, max_seq_len=256, max_batch_size=max(batch_sizes))
    weight_bytes = param_count(args) * 2
    model = random_model(args, torch.bfloat16, world, rank)
    say = print if is_rank_zero() else (lambda *x, **k: None)
    say(f"{a.model}, {world} x {torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s in all, "
        f"limit {bandwidth / weight_bytes:.0f} tok/s at batch 1", flush=True)

    rows, faithful, seq = [], None, None
    parts = [x for x in a.paths.split(",") if x]
    for name, make in PATHS.items():
        if parts and not any(part in name for part in parts):
            continue
        args.max_seq_len, args.max_batch_size = 256, max(batch_sizes)
        model.reset_buffers(device, torch.bfloat16)
        row = {"path": name}
        try:
            decoder = make(model)
            llama = Llama(model, tokenizer, decoder)
            if isinstance(decoder, FastDecoder):
                row["warmup_s"] = decoder.warmup((1,))
            rates = decode_rates(llama, batch_sizes, 0.0)
            row["tok_s"] = {bs: r[0] for bs, r in rates.items()}
            if faithful is None:
                faithful = decoder
                out, _ = llama.generate([list(range(1000, 1000 + PROMPT_LEN))], max_gen_len=240, temperature=0, echo=True)
                seq = torch.tensor(out, device=device)
            else:
                row["agreement"] = greedy_agreement(faithful, decoder, seq, PROMPT_LEN)
            args.max_seq_len, args.max_batch_size = PREFILL_LEN + 48, 1
            model.reset_buffers(device, torch.bfloat16)
            row["prefill_ms"] = prefill_seconds(llama) * 1e3
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except Exception as e:  # reported, and the next path runs
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if is_rank_zero():
                traceback.print_exc()
        say(json.dumps(row), flush=True)
        rows.append(row)
        dist.barrier()

    say(f"\n| {a.model} MP={world} path | " + " | ".join(f"bs {bs} tok/s" for bs in batch_sizes)
        + " | bs1 % of limit | prefill 2000 ms | agreement with faithful | warm-up s |")
    say("|---" * (len(batch_sizes) + 5) + "|")
    for r in rows:
        if "error" in r:
            say(f"| {r['path']} | failed: {r['error'][:120]} |")
            continue
        pct = 100 * r["tok_s"][1] * weight_bytes / bandwidth if 1 in r["tok_s"] else float("nan")
        agree = f"{100 * r['agreement']:.1f}%" if "agreement" in r else "-"
        say(f"| {r['path']} | " + " | ".join(f"{r['tok_s'][bs]:.0f}" for bs in batch_sizes)
            + f" | {pct:.0f}% | {r['prefill_ms']:.0f} | {agree} | {r.get('warmup_s', 0):.1f} |")
    if a.json and is_rank_zero():
        with open(a.json, "w") as f:
            json.dump({"world_size": world, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    shutdown()


if __name__ == "__main__":
    main()
