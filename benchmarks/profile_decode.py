"""Where a fast-path decode step spends its time: kernel totals from torch.profiler.

    python benchmarks/profile_decode.py [--model 7B] [--batch 1]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode import SHAPES, random_model  # noqa: E402

from llama import ModelArgs  # noqa: E402
from llama.fast import FastDecoder  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="7B", choices=list(SHAPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args()
    args = ModelArgs(**SHAPES[a.model], vocab_size=32000, max_seq_len=256, max_batch_size=a.batch)
    model = random_model(args, torch.bfloat16)
    dec = FastDecoder(model)
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
    for name, us, n in rows[:25]:
        print(f"{us:9.1f} us {n:5d}x  {name[:110]}")


if __name__ == "__main__":
    main()
