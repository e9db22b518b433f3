"""Where a fast-path decode step spends its time: kernel totals from torch.profiler.

    python benchmarks/profile_decode.py [--model 7B] [--batch 1] [--variants default,default/cublas]

Each variant (as `benchmarks/decode.py --compile`) on the same weights: the time of a
replayed decode step, then the GPU kernels of 10 steps by total time.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode import SHAPES, decode_rates, fast_variant, no_eos, random_model  # noqa: E402

from llama import Llama, ModelArgs  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="7B", choices=list(SHAPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--variants", default="default")
    p.add_argument("--top", type=int, default=25, help="kernels listed per variant")
    p.add_argument("--generate", action="store_true",
                   help="also time Llama.generate end to end and list its host-side calls")
    p.add_argument("--tokenizer", default="tests/fixtures/tokenizer.model")
    a = p.parse_args()
    args = ModelArgs(**SHAPES[a.model], vocab_size=32000, max_seq_len=256, max_batch_size=a.batch)
    model = random_model(args, torch.bfloat16)
    for spec in a.variants.split(","):
        dec, label = fast_variant(model, spec)
        print(f"== {spec}: {label}", flush=True)
        profile(dec, a)
        if a.generate:
            profile_generate(Llama(model, no_eos(Tokenizer(a.tokenizer)), dec), a)
        model.reset_buffers(torch.device("cuda"), torch.bfloat16)


def profile(dec, a):
    tokens = torch.randint(100, 30000, (a.batch, 1), device="cuda")
    with torch.inference_mode():
        dec(torch.randint(100, 30000, (a.batch, 16), device="cuda"), 0, False)
        for pos in range(16, 20):
            dec(tokens, pos, False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(a.steps):
            dec(tokens, 20 + i, False)
        torch.cuda.synchronize()
        step = (time.perf_counter() - t0) / a.steps
        print(f"graph replay only: {step * 1e3:.3f} ms/step = {a.batch / step:.0f} tok/s")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(10):
                dec(tokens, 100 + i, False)
            torch.cuda.synchronize()
    events = prof.key_averages()
    rows = sorted(((e.key, e.device_time_total / 10, e.count // 10) for e in events if e.device_time_total > 0),
                  key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    print(f"GPU kernel time per step: {total / 1e3:.3f} ms in {sum(r[2] for r in rows)} kernels")
    for name, us, n in rows[:a.top]:
        print(f"{us:9.1f} us {n:5d}x  {name[:110]}")


def profile_generate(llama, a):
    """Decode tokens/s through Llama.generate, as benchmarks/decode.py measures it, and the
    host-side calls of one 64-token generate (syncs and copies show up here)."""
    rate = decode_rates(llama, [a.batch], 0.0)[a.batch][0]
    print(f"generate, greedy: {1e3 * a.batch / rate:.3f} ms/token = {rate:.0f} tok/s")
    prompts = [list(range(1000, 1016))] * a.batch
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        llama.generate(prompts, max_gen_len=64, temperature=0.0)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    print("host calls of one 64-token generate, by host time:")
    for e in rows[:a.top]:
        print(f"{e.self_cpu_time_total / 1e3:9.2f} ms {e.count:6d}x  {e.key[:100]}")


if __name__ == "__main__":
    main()
