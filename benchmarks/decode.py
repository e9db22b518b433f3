"""Decode speed of every weight format, beside the reference-style path, on random weights of a real shape.

    python benchmarks/decode.py --model 7B [--formats bf16,int8,int4] [--batch_sizes 1,8,32,64]
                                [--paths reference,reference-fairscale] [--json out.json]

In one run: the GPU's copy bandwidth; then for each path, decode tokens/s at each batch
size (prompt 16 tokens, 128 new; greedy and temperature 0.6 / top-p 0.9), its % of the
bandwidth limit at batch 1 (that format's bytes read per token), time to first token, a
2000-token prefill, preparation time (graph capture; nothing is compiled) and peak GPU
memory, and for ours the teacher-forced greedy agreement with the faithful forward on the
same weights. The reference-style paths are the reference's computation: fp16, the
model's forward with its dynamically sliced KV cache, a host sync every step; once with
plain layers, once with fairscale's parallel layers at one rank, as the reference runs on
one GPU. Warm-up is excluded from the timings.
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (SHAPES, TOKENIZER, bytes_per_token, copy_bandwidth, fast_decoder, median_time,  # noqa: E402
                    no_eos, random_model, spec_for, sync_time, with_fairscale_layers)

from llama import Llama  # noqa: E402
from llama.kernels import ahead  # noqa: E402
from llama.config import ModelArgs  # noqa: E402
from llama.distributed import choose_device, init_model_parallel, shutdown, silence_other_ranks  # noqa: E402
from llama.fast import FaithfulDecoder  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

PROMPT_LEN, NEW_TOKENS, PREFILL_LEN = 16, 128, 2000


def decode_rates(llama: Llama, batch_sizes, temperature: float, repeats: int):
    """{bs: (decode tokens/s, time to first token s, tokens/s of each run)}.

    tokens/s = bs * (NEW - 1) / (T(NEW) - T(1)), each T the median of `repeats` timed generates.
    """
    gen = torch.Generator().manual_seed(1)
    out = {}
    for bs in batch_sizes:
        prompts = torch.randint(100, 30000, (bs, PROMPT_LEN), generator=gen).tolist()

        def run(n):
            return llama.generate(prompts, max_gen_len=n, temperature=temperature, top_p=0.9)

        run(NEW_TOKENS)  # warm-up: captures this batch size
        t1 = median_time(lambda: run(1), repeats)
        tns = [sync_time(lambda: run(NEW_TOKENS))[0] for _ in range(repeats)]
        out[bs] = (bs * (NEW_TOKENS - 1) / (statistics.median(tns) - t1), t1,
                   [bs * (NEW_TOKENS - 1) / (tn - t1) for tn in tns])
    return out


def prefill_ms(llama: Llama) -> float:
    llama.decoder.setup_cache(1, PREFILL_LEN + 48)
    tokens = torch.randint(100, 30000, (1, PREFILL_LEN), device="cuda")
    with torch.inference_mode():
        llama.decoder(tokens, 0, False)
        best = min(sync_time(lambda: llama.decoder(tokens, 0, False))[0] for _ in range(5))
    return best * 1e3


@torch.inference_mode()
def agreement(faithful, fast, tokens: torch.Tensor, prompt_len: int) -> float:
    """Teacher-forced greedy agreement of two decoders fed the same tokens (bs, len)."""
    picks = []
    for decoder in (faithful, fast):
        out = [decoder(tokens[:, :prompt_len], 0, False)[:, -1].argmax(-1)]
        for pos in range(prompt_len, tokens.shape[1] - 1):
            out.append(decoder(tokens[:, pos : pos + 1], pos, False)[:, -1].argmax(-1))
        picks.append(torch.stack(out, dim=1))
    return (picks[0] == picks[1]).float().mean().item()


def bench(name, llama, batch_sizes, repeats, limit_bytes, bandwidth, prepare_s=0.0):
    torch.cuda.reset_peak_memory_stats()
    greedy = decode_rates(llama, batch_sizes, 0.0, repeats)
    print(name, "greedy", {bs: round(r[0], 1) for bs, r in greedy.items()}, flush=True)
    sampled = decode_rates(llama, batch_sizes, 0.6, repeats)
    print(name, "sampled", {bs: round(r[0], 1) for bs, r in sampled.items()}, flush=True)
    return {
        "path": name,
        "greedy_tok_s": {bs: r[0] for bs, r in greedy.items()},
        "sampled_tok_s": {bs: r[0] for bs, r in sampled.items()},
        "greedy_runs_tok_s": {bs: r[2] for bs, r in greedy.items()},
        "ttft_ms": greedy[batch_sizes[0]][1] * 1e3,
        "bs1_pct_of_limit": 100 * greedy[1][0] * limit_bytes / bandwidth if 1 in greedy else None,
        "limit_tok_s": bandwidth / limit_bytes,
        "prepare_s": prepare_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="7B", choices=list(SHAPES))
    p.add_argument("--formats", default="bf16", help="ours, comma-separated: bf16, int8, int4 (int4-g64, ...)")
    p.add_argument("--batch_sizes", default="1,8,32,64")
    p.add_argument("--paths", default="reference,reference-fairscale",
                   help="reference-style rows: reference, reference-fairscale (empty: none)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is reported")
    p.add_argument("--no_agreement", action="store_true")
    p.add_argument("--pdl", default=None,
                   help="ours once per launch mode, comma-separated (llama.kernels.ahead.pdl: 0 plain, 1 dependent)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    batch_sizes = [int(x) for x in a.batch_sizes.split(",")]
    tokenizer = no_eos(Tokenizer(TOKENIZER))
    torch.backends.cuda.matmul.allow_tf32 = True
    bandwidth = copy_bandwidth()  # of one GPU (under model parallel each reads its share)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    args = ModelArgs(**SHAPES[a.model], vocab_size=tokenizer.n_words, max_seq_len=256, max_batch_size=max(batch_sizes))
    rows = []
    world = int(os.environ.get("WORLD_SIZE", 1))  # under torchrun: model parallel, one GPU a rank
    rank, world = init_model_parallel(world, choose_device(None))
    silence_other_ranks()

    for path in [x for x in a.paths.split(",") if x]:
        model = random_model(args, torch.float16, world_size=world, rank=rank)
        if path == "reference-fairscale" and world == 1:
            model = with_fairscale_layers(model)
        label = {"reference": "reference-style (fp16 eager)",
                 "reference-fairscale": "reference-style, fairscale layers (fp16 eager)"}[path]
        llama = Llama(model, tokenizer, FaithfulDecoder(model))
        rows.append(bench(label, llama, batch_sizes, a.repeats, bytes_per_token(args, None) // world, bandwidth))
        rows[-1]["prefill_ms"] = prefill_ms(llama)
        print(json.dumps(rows[-1]), flush=True)
        del model, llama
        torch.cuda.empty_cache()
    n_reference = len(rows)

    modes = [int(m) for m in a.pdl.split(",")] if a.pdl else [None]
    for fmt in a.formats.split(","):
        spec = spec_for(fmt, args)
        args.max_seq_len, args.max_batch_size = 256, max(batch_sizes)
        model = random_model(args, torch.bfloat16, spec, world, rank)
        seq = None
        if not a.no_agreement:  # the same seeded weights, untransformed, on the faithful forward
            faithful = Llama(random_model(args, torch.bfloat16, spec, world, rank), tokenizer)
            with torch.inference_mode():
                seq, _ = faithful.generate([list(range(1000, 1000 + PROMPT_LEN))] * 2, max_gen_len=240,
                                           temperature=0, echo=True)
        decoder = fast_decoder(model, torch.bfloat16, spec)
        llama = Llama(model, tokenizer, decoder)
        for mode in modes:
            label = f"ours ({fmt}, fast path{f', {world} GPUs' if world > 1 else ''}{'' if mode is None else f', launches {mode}'})"
            if mode is not None:
                ahead.set_pdl(mode)
                decoder.setup_cache(max(batch_sizes), 256)  # graphs recorded again
            prep, _ = sync_time(lambda: llama.generate([[1, 2, 3]], max_gen_len=2, temperature=0))
            rows.append(bench(label, llama, batch_sizes, a.repeats, bytes_per_token(args, spec) // world, bandwidth,
                              prep))
            if seq is not None:
                rows[-1]["agreement"] = agreement(faithful.decoder, decoder, torch.tensor(seq, device="cuda"),
                                                  PROMPT_LEN)
                print(f"{label}: teacher-forced greedy agreement with the faithful forward over 240 positions: "
                      f"{rows[-1]['agreement']:.3f}", flush=True)
            rows[-1]["prefill_ms"] = prefill_ms(llama)
            print(json.dumps(rows[-1]), flush=True)
        if seq is not None:
            del faithful
        del model, llama, decoder
        torch.cuda.empty_cache()

    print()
    print(f"{a.model} on {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"prompt {PROMPT_LEN}, {NEW_TOKENS} new tokens; decode tokens/s (greedy / t=0.6 top-p 0.9)")
    print("| path | " + " | ".join(f"bs {bs}" for bs in batch_sizes)
          + " | bs1 % of its limit (limit) | TTFT ms | prefill 2000 ms | prepare s | peak GiB | agreement |")
    print("|---" * (len(batch_sizes) + 7) + "|")
    for r in rows:
        cells = [f"{r['greedy_tok_s'][bs]:.0f} / {r['sampled_tok_s'][bs]:.0f}" for bs in batch_sizes]
        pct = f"{r['bs1_pct_of_limit']:.0f}% ({r['limit_tok_s']:.0f})" if r["bs1_pct_of_limit"] else "-"
        agree = f"{r['agreement']:.3f}" if "agreement" in r else "-"
        print(f"| {r['path']} | " + " | ".join(cells) + f" | {pct} | {r['ttft_ms']:.1f} | {r['prefill_ms']:.0f} | "
              f"{r['prepare_s']:.1f} | {r['peak_gib']:.1f} | {agree} |")
    for ref in rows[:n_reference]:
        for ours in rows[n_reference:]:
            ratios = " | ".join(f"{ours['greedy_tok_s'][bs] / ref['greedy_tok_s'][bs]:.1f}x" for bs in batch_sizes)
            print(f"| {ours['path']} / {ref['path']} (greedy) | {ratios} |")
    bs = batch_sizes[0]
    print(f"each timed run's greedy tokens/s at batch {bs} (the table has the median):")
    for r in rows:
        print(f"  {r['path']}: " + ", ".join(f"{x:.0f}" for x in r["greedy_runs_tok_s"][bs]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "bandwidth": bandwidth, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    try:
        main()
    finally:
        shutdown()
