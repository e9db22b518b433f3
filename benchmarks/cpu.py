"""On a CPU: ours beside llama.cpp, same machine, same threads, random weights of the same shape.

    python benchmarks/cpu.py --shape 1B [--threads 2] [--formats bf16,int8,int4] [--fast]
                             [--llama_bench PATH --gguf_dir DIR]

For each format, in a fresh process (so that peak memory is that format's alone): load
time of `Llama.build(..., device="cpu")` from a warm page cache, batch-1 decode tokens/s
(32 new tokens after a 64-token prompt, greedy, the first token excluded), prompt
processing of 64 and 512 tokens (tokens/s of one prefill) and peak resident memory.
Beside it, when given, llama.cpp's `llama-bench` on the GGUF files of the same shape
(`../shared/bench/llamacpp/run_llamacpp.sh` writes them: F16, Q8_0, Q4_K_M), tests
tg32 / pp64 / pp512 with the same thread count.
"""

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHAPES = {
    "1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, multiple_of=256),
    "7B": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256),
}
TOKENIZER = str(REPO / "tests/fixtures/tokenizer.model")
GGUF = {"bf16": "f16", "int8": "q8_0", "int4": "q4_k_m"}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def child(ckpt: str, fmt: str, threads: int, fast: bool = False) -> dict:
    """One format, in this process; returns its measurements."""
    import torch

    from llama import Llama

    t0 = time.perf_counter()
    llama = Llama.build(ckpt, TOKENIZER, max_seq_len=640, max_batch_size=1, device="cpu", dtype="bfloat16",
                        quantize=None if fmt == "bf16" else fmt, threads=threads, fast=fast or None)
    load_s = time.perf_counter() - t0
    tok = llama.tokenizer
    gen = torch.Generator().manual_seed(0)
    out = {"format": fmt, "load_s": load_s, "threads": torch.get_num_threads(), "fast": fast}
    with torch.inference_mode():
        for n in (64, 512):
            prompt = torch.randint(100, 30000, (1, n), generator=gen)
            llama.decoder(prompt, 0, False)  # warm-up
            t = time.perf_counter()
            llama.decoder(prompt, 0, False)
            out[f"pp{n}_tok_s"] = n / (time.perf_counter() - t)
    never = copy.copy(tok)  # random weights emit EOS at random: every run generates all its tokens
    never.eos_id = -100
    prompt = [[1] + torch.randint(100, 30000, (63,), generator=gen).tolist()]
    runner = Llama(llama.model, never, llama.decoder)
    runner.generate(prompt, max_gen_len=2, temperature=0)
    t = time.perf_counter()
    runner.generate(prompt, max_gen_len=1, temperature=0)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    runner.generate(prompt, max_gen_len=33, temperature=0)
    out["tg32_tok_s"] = 32 / (time.perf_counter() - t - t1)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return out


def llama_bench(binary: str, gguf: Path, threads: int) -> dict:
    res = subprocess.run([binary, "-m", str(gguf), "-p", "64,512", "-n", "32", "-t", str(threads), "-r", "2",
                          "-o", "json"], capture_output=True, text=True)
    if res.returncode:
        return {"error": res.stderr[-500:]}
    rows = json.loads(res.stdout)
    out = {}
    for r in rows:
        name = f"tg{r['n_gen']}" if r["n_gen"] else f"pp{r['n_prompt']}"
        out[f"{name}_tok_s"] = r["avg_ts"]
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1B", choices=list(SHAPES))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--formats", default="bf16,int8,int4")
    p.add_argument("--ckpt_dir", default=None)
    p.add_argument("--llama_bench", default=None, help="llama.cpp's llama-bench binary")
    p.add_argument("--gguf_dir", default="/tmp/llamacpp-anchor", help="llama2-<shape>-random-<type>.gguf files")
    p.add_argument("--fast", action="store_true", help="the fast path (fast=True) rather than the CPU's default")
    p.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child[0], a.child[1], int(a.child[2]), a.child[3] == "fast")), flush=True)
        return
    ckpt = Path(a.ckpt_dir or f"/tmp/cpu-bench-{a.shape}")
    if not (ckpt / "params.json").exists():
        cmd = [sys.executable, "-m", "llama.tools.random_checkpoint", str(ckpt)]
        for k, v in SHAPES[a.shape].items():
            cmd += [f"--{k}", str(v)]
        subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    for f in ckpt.iterdir():
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    print(f"{cpu_name()}, {a.threads} threads, {a.shape} shape{', fast path' if a.fast else ''}", flush=True)
    rows = []
    for fmt in a.formats.split(","):
        res = subprocess.run([sys.executable, __file__, "--child", str(ckpt), fmt, str(a.threads),
                              "fast" if a.fast else "default"], cwd=REPO,
                             capture_output=True, text=True)
        line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
        ours = json.loads(line[7:]) if line else {"error": res.stderr[-800:]}
        theirs = {}
        if a.llama_bench:
            gguf = Path(a.gguf_dir) / f"llama2-{a.shape}-random-{GGUF[fmt]}.gguf"
            theirs = llama_bench(a.llama_bench, gguf, a.threads) if gguf.exists() else {"error": f"no {gguf}"}
        rows.append((fmt, ours, theirs))
        print(fmt, json.dumps(ours), json.dumps(theirs), flush=True)
    print()
    print("| format (ours / llama.cpp) | decode tg32 tok/s | ratio | pp64 tok/s | pp512 tok/s | load s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|")
    for fmt, ours, theirs in rows:
        if "error" in ours:
            print(f"| {fmt} | error | | | | | |")
            continue

        def pair(key):
            t = theirs.get(key)
            return f"{ours[key]:.2f} / {t:.2f}" if t else f"{ours[key]:.2f}"

        ratio = f"{ours['tg32_tok_s'] / theirs['tg32_tok_s']:.2f}x" if theirs.get("tg32_tok_s") else "-"
        print(f"| {fmt} / {GGUF[fmt].upper()} | {pair('tg32_tok_s')} | {ratio} | {pair('pp64_tok_s')} | "
              f"{pair('pp512_tok_s')} | {ours['load_s']:.2f} | {ours['peak_rss_gb']:.2f} |")


if __name__ == "__main__":
    main()
