"""Decode speed: our fast path vs the reference-style eager path, on random weights of a real shape.

    python benchmarks/decode.py --model 7B [--batch_sizes 1,8,32,64] [--json out.json]

In one run: the GPU's measured copy bandwidth; then, for each path, decode tokens/s
at each batch size (prompt 16 tokens, 128 new, greedy and temperature 0.6 / top-p 0.9),
% of the bandwidth limit at batch 1, time to first token, prefill of a 2000-token
prompt, compile warm-up and peak GPU memory. The reference-style paths are the
reference's computation: fp16, the model's forward with its dynamically sliced KV cache,
a host sync every step; once with plain layers, once with fairscale's parallel layers at
one rank, as the reference runs on one GPU. Warm-up and compilation are excluded from
the timings.
"""

import argparse
import copy
import json
import statistics
import time

import torch

from llama import Llama, ModelArgs, Transformer
from llama.distributed import init_model_parallel, shutdown
from llama.fast import FaithfulDecoder, FastDecoder
from llama.fast.agreement import greedy_agreement
from llama.loading import empty_model
from llama.memory import param_count
from llama.parallel import parallelize
from llama.tools.random_checkpoint import random_tensor
from llama.tokenizer import Tokenizer

SHAPES = {
    "7B": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
}
PROMPT_LEN, NEW_TOKENS, PREFILL_LEN = 16, 128, 2000
# --paths names of the reference-style rows: (label, fairscale's layers at one rank?).
# The reference builds its one-GPU model from fairscale's parallel layers; ours keeps plain ones.
REFERENCE_PATHS = {
    "reference": ("reference-style (fp16 eager)", False),
    "reference-fairscale": ("reference-style, fairscale layers (fp16 eager)", True),
}


def sync_time(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def copy_bandwidth(gib: float = 4.0) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), median of 20."""
    n = int(gib * 2**30) // 4
    a, b = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    a.normal_()
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * n * 4 / sorted(times)[len(times) // 2]


def random_model(args: ModelArgs, dtype: torch.dtype, world_size: int = 1, rank: int = 0,
                 fairscale_at_one: bool = False) -> Transformer:
    """The model built on the meta device (this rank's slice of it under model parallel), then
    filled with random weights on the current GPU, seeded by the rank."""
    model = parallelize(empty_model(args), world_size, at_one=fairscale_at_one)
    gen = torch.Generator(device="cuda").manual_seed(rank)
    state = {k: random_tensor(k, tuple(v.shape), gen, dtype, "cuda") for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    model.requires_grad_(False)
    model.reset_buffers(torch.device("cuda"), dtype)
    return model


def fast_variant(model: Transformer, spec: str):
    """(FastDecoder, label) for a variant 'mode' or 'mode/cublas' (see --compile)."""
    mode, _, mm = spec.partition("/")
    if mm not in ("", "cublas"):
        raise SystemExit(f"unknown fast path variant {spec!r}")
    decoder = FastDecoder(model, compile=True if mode == "default" else mode, small_mm=False if mm else None)
    label = "fast (bf16, compiled, CUDA graphs)" if mode == "default" else f"fast (bf16, compile={mode}, CUDA graphs)"
    return decoder, label + (", cuBLAS at batch <= 8" if mm else "")


def no_eos(tokenizer: Tokenizer) -> Tokenizer:
    """Random weights emit EOS at random; every run here generates all its tokens."""
    tok = copy.copy(tokenizer)
    tok.eos_id = -100
    return tok


def decode_rates(llama: Llama, batch_sizes, temperature: float, repeats: int = 3):
    """{bs: (decode tokens/s, time to first token s, tokens/s of each run)}.

    tokens/s = bs * (NEW - 1) / (T(NEW) - T(1)), each T the median of `repeats` timed
    generates; the list has the rate of each T(NEW) run against the median T(1).
    """
    gen = torch.Generator().manual_seed(1)
    out = {}
    for bs in batch_sizes:
        prompts = torch.randint(100, 30000, (bs, PROMPT_LEN), generator=gen).tolist()

        def run(n):
            return llama.generate(prompts, max_gen_len=n, temperature=temperature, top_p=0.9)

        run(NEW_TOKENS)  # warm-up: compiles and captures this batch size
        t1 = statistics.median(sync_time(lambda: run(1))[0] for _ in range(repeats))
        tns = [sync_time(lambda: run(NEW_TOKENS))[0] for _ in range(repeats)]
        out[bs] = (bs * (NEW_TOKENS - 1) / (statistics.median(tns) - t1), t1,
                   [bs * (NEW_TOKENS - 1) / (tn - t1) for tn in tns])
    return out


def prefill_seconds(llama: Llama) -> float:
    tokens = torch.randint(100, 30000, (1, PREFILL_LEN), device="cuda")
    llama.decoder(tokens, 0, False)
    return min(sync_time(lambda: llama.decoder(tokens, 0, False))[0] for _ in range(5))


def bench_path(name, model, tokenizer, decoder, batch_sizes, weight_bytes, bandwidth, repeats):
    llama = Llama(model, tokenizer, decoder)
    torch.cuda.reset_peak_memory_stats()
    warm = 0.0
    if isinstance(decoder, FastDecoder):
        warm, _ = sync_time(lambda: decoder.warmup((1,)))
    greedy = decode_rates(llama, batch_sizes, 0.0, repeats)
    print(name, "greedy", {bs: round(r[0], 1) for bs, r in greedy.items()}, flush=True)
    sampled = decode_rates(llama, batch_sizes, 0.6, repeats)
    print(name, "sampled", {bs: round(r[0], 1) for bs, r in sampled.items()}, flush=True)
    row = {
        "path": name,
        "greedy_tok_s": {bs: r[0] for bs, r in greedy.items()},
        "sampled_tok_s": {bs: r[0] for bs, r in sampled.items()},
        "greedy_runs_tok_s": {bs: r[2] for bs, r in greedy.items()},
        "ttft_ms": greedy[batch_sizes[0]][1] * 1e3,
        "bs1_pct_of_limit": 100 * greedy[1][0] * weight_bytes / bandwidth if 1 in greedy else None,
        "compile_warmup_s": warm,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="7B", choices=list(SHAPES))
    p.add_argument("--batch_sizes", default="1,8,32,64")
    p.add_argument("--tokenizer", default="tests/fixtures/tokenizer.model")
    p.add_argument("--json", default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is reported")
    p.add_argument("--paths", default="reference,reference-fairscale,fast",
                   help="which paths to measure: " + ", ".join([*REFERENCE_PATHS, "fast"]))
    p.add_argument("--compile", default="default", help="fast path variants, comma-separated, each a row: "
                   "a compile mode (default, tuned, max-autotune), '/cublas' after it for cuBLAS instead of "
                   "llama.gemv at small batches")
    a = p.parse_args()
    paths = a.paths.split(",")
    batch_sizes = [int(x) for x in a.batch_sizes.split(",")]
    tokenizer = no_eos(Tokenizer(a.tokenizer))
    torch.backends.cuda.matmul.allow_tf32 = True

    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    args = ModelArgs(**SHAPES[a.model], vocab_size=tokenizer.n_words, max_seq_len=256, max_batch_size=max(batch_sizes))
    weight_bytes = param_count(args) * 2
    rows = []

    for path in [name for name in paths if name in REFERENCE_PATHS]:
        # Reference-style: fp16, the faithful forward (dynamic cache slices), EOS check every step.
        label, fairscale_at_one = REFERENCE_PATHS[path]
        if fairscale_at_one:
            init_model_parallel(1, torch.device("cuda"))
        args.max_seq_len, args.max_batch_size = 256, max(batch_sizes)
        model = random_model(args, torch.float16, fairscale_at_one=fairscale_at_one)
        rows.append(bench_path(label, model, tokenizer, FaithfulDecoder(model), batch_sizes, weight_bytes, bandwidth,
                               a.repeats))
        args.max_seq_len, args.max_batch_size = PREFILL_LEN + 48, 1
        model.reset_buffers(torch.device("cuda"), torch.float16)
        rows[-1]["prefill_ms"] = prefill_seconds(Llama(model, tokenizer, FaithfulDecoder(model))) * 1e3
        print(json.dumps(rows[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    n_reference = len(rows)
    if "fast" not in paths:
        return

    # Ours: bf16, fast path, once per compile mode on the same weights.
    model = random_model(args, torch.bfloat16)
    for i, mode in enumerate(a.compile.split(",")):
        args.max_seq_len, args.max_batch_size = 256, max(batch_sizes)
        model.reset_buffers(torch.device("cuda"), torch.bfloat16)
        fast_decoder, label = fast_variant(model, mode)
        rows.append(bench_path(label, model, tokenizer, fast_decoder, batch_sizes, weight_bytes, bandwidth,
                               a.repeats))
        if i == 0:
            # Same bf16 weights, faithful forward vs fast path, fed the same 240 tokens.
            faithful = Llama(model, tokenizer, FaithfulDecoder(model))
            seq, _ = faithful.generate([list(range(1000, 1000 + PROMPT_LEN))], max_gen_len=240, temperature=0, echo=True)
            agree = greedy_agreement(faithful.decoder, fast_decoder, torch.tensor(seq, device="cuda"), PROMPT_LEN)
            rows[-1]["bf16_agreement"] = agree
            print(f"bf16 teacher-forced greedy agreement over 240 positions, fast vs faithful: {agree:.3f}", flush=True)
        args.max_seq_len, args.max_batch_size = PREFILL_LEN + 48, 1
        model.reset_buffers(torch.device("cuda"), torch.bfloat16)
        rows[-1]["prefill_ms"] = prefill_seconds(Llama(model, tokenizer, fast_decoder)) * 1e3
        print(json.dumps(rows[-1]), flush=True)
        del fast_decoder
    print()
    print(f"{a.model} on {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, "
          f"weights {weight_bytes / 1e9:.1f} GB -> limit {bandwidth / weight_bytes:.0f} tok/s at batch 1")
    print(f"prompt {PROMPT_LEN}, {NEW_TOKENS} new tokens; decode tokens/s (greedy / t=0.6 top-p 0.9)")
    print("| path | " + " | ".join(f"bs {bs}" for bs in batch_sizes)
          + " | bs1 % of limit | TTFT ms | prefill 2000 ms | warm-up s | peak GiB |")
    print("|---" * (len(batch_sizes) + 6) + "|")
    for r in rows:
        cells = [f"{r['greedy_tok_s'][bs]:.0f} / {r['sampled_tok_s'][bs]:.0f}" for bs in batch_sizes]
        pct = f"{r['bs1_pct_of_limit']:.0f}%" if r["bs1_pct_of_limit"] else "-"
        print(f"| {r['path']} | " + " | ".join(cells)
              + f" | {pct} | {r['ttft_ms']:.1f} | {r['prefill_ms']:.0f} | {r['compile_warmup_s']:.1f} | {r['peak_gib']:.1f} |")
    for ref in rows[:n_reference]:
        for fast in rows[n_reference:]:
            ratios = " | ".join(f"{fast['greedy_tok_s'][bs] / ref['greedy_tok_s'][bs]:.1f}x" for bs in batch_sizes)
            print(f"| {fast['path']} / {ref['path']} (greedy) | {ratios} |")
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
