"""Load time and memory: our lean loading vs a reference-style load, on Meta-format files.

    python benchmarks/load.py [--dir /tmp/llama-bench]

Writes random bf16 checkpoints of the real 7B (1 shard) and 13B (2 shards) shapes in
Meta's format, reads them once to warm the page cache, then loads each in a fresh
process and reports seconds, peak host memory (anonymous and file-backed resident pages,
sampled every 20 ms) and peak GPU memory:
- ours: `Llama.build` (meta-device model, memory-mapped shards, tensors straight to the GPU);
- reference-style: torch.load of the whole shard into RAM, the model allocated on the GPU
  with random init, load_state_dict, as Meta's reference does;
- ours, 13B: both shards merged at load time onto one GPU, then a short generation.
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

SHAPES = {
    "7B": ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}, 1),
    "13B": ({"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05, "vocab_size": -1}, 2),
}
TOKENIZER = "tests/fixtures/tokenizer.model"


def write_checkpoints(root: Path):
    from llama.checkpoint import save_checkpoint, shard_for_rank
    from llama.config import ModelArgs
    from llama.tools.random_checkpoint import random_state

    for name, (params, shards) in SHAPES.items():
        out = root / name
        if (out / "params.json").exists():
            continue
        t0 = time.time()
        state = random_state(ModelArgs.from_params(params, vocab_size=32000), device="cuda")
        parts = [{k: v.cpu() for k, v in shard_for_rank([state], r, shards).items()} for r in range(shards)]
        del state
        save_checkpoint(parts, params, out)
        del parts
        torch.cuda.empty_cache()
        print(f"wrote {name} ({shards} shard(s)) in {time.time() - t0:.0f} s", flush=True)


class HostMemory:
    """Peak anonymous and file-backed resident memory of this process, sampled in a thread."""

    def __init__(self):
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self):
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)

    def _run(self):
        while not self._stop:
            self._sample()
            time.sleep(0.02)

    def stop(self):
        self._stop = True
        self._thread.join()
        self._sample()
        return {k: v / 2**30 for k, v in self.peak.items()}


def build_phases(ckpt_dir: str) -> dict:
    """The steps of Llama.build one by one, each timed (seconds)."""
    from llama import build, checkpoint, distributed, memory
    from llama.tokenizer import Tokenizer

    times, t = {}, time.perf_counter()

    def mark(name):
        nonlocal t
        torch.cuda.synchronize()
        now = time.perf_counter()
        times[name] = round(now - t, 3)
        t = now

    dev = distributed.choose_device(None)
    distributed.init_model_parallel(None, dev)
    mark("process group + fairscale")
    tokenizer = Tokenizer(TOKENIZER)
    ckpt = checkpoint.open_checkpoint(ckpt_dir, vocab_size=tokenizer.n_words)
    ckpt.args.max_seq_len, ckpt.args.max_batch_size = 256, 1
    memory.check_fits(ckpt.args, torch.bfloat16, 1, dev)
    mark("tokenizer + open and check shards")
    model = build.load_model(ckpt, 0, 1, dev, torch.bfloat16, None, False)
    mark("model + weights to GPU")
    model.setup_cache(1, 256, dev, torch.bfloat16)
    decoder = build.finish_model(model, torch.bfloat16, None, use_fast=True)
    mark("cache + fast path transform")
    decoder.prepare()
    mark("decode graphs (prepare)")
    return times


def child(mode: str, ckpt_dir: str):
    """One load, in this fresh process; prints a JSON line."""
    from llama import Llama
    from llama.checkpoint import read_params
    from llama.config import ModelArgs
    from llama.model import Transformer

    mem = HostMemory()
    torch.cuda.init()
    torch.empty(1, device="cuda")
    t0 = time.perf_counter()  # imports and CUDA start-up are outside the timing, for both loaders
    extra = {}
    if mode == "reference":
        sd = torch.load(Path(ckpt_dir) / "consolidated.00.pth", map_location="cpu", weights_only=True)
        args = ModelArgs(max_seq_len=256, max_batch_size=1, **dict(read_params(ckpt_dir), vocab_size=32000))
        torch.set_default_dtype(torch.float16)
        with torch.device("cuda"):
            model = Transformer(args)  # random init, as nn.Linear does
        model.load_state_dict(sd, strict=False)
        torch.cuda.synchronize()
    elif mode == "ours-phases":
        extra["phases"] = build_phases(ckpt_dir)
    else:
        llama = Llama.build(ckpt_dir, TOKENIZER, max_seq_len=256, max_batch_size=1, fast=False)
        torch.cuda.synchronize()
        if mode == "ours-generate":
            extra["generation"] = llama.text_completion(["Hello"], temperature=0, max_gen_len=8)[0]["generation"]
    seconds = time.perf_counter() - t0
    host = mem.stop()
    print(json.dumps({"mode": mode, "ckpt": Path(ckpt_dir).name, "seconds": seconds,
                      "host_anon_gib": host["RssAnon"], "host_file_gib": host["RssFile"], "host_rss_gib": host["VmRSS"],
                      "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30, **extra}), flush=True)


def run_child(mode, ckpt_dir):
    res = subprocess.run([sys.executable, __file__, "--child", mode, ckpt_dir], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/tmp/llama-bench")
    p.add_argument("--child", nargs=2, default=None)
    a = p.parse_args()
    if a.child:
        return child(*a.child)
    root = Path(a.dir)
    write_checkpoints(root)
    for name in SHAPES:  # warm the page cache
        for f in sorted((root / name).glob("*.pth")):
            with open(f, "rb") as fh:
                while fh.read(1 << 26):
                    pass
    rows = []
    runs = [("ours", "7B"), ("reference", "7B"), ("ours", "7B"), ("reference", "7B"), ("ours-generate", "13B"),
            ("ours-phases", "7B")]
    for mode, name in runs:
        rows.append(run_child(mode, str(root / name)))
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"{torch.cuda.get_device_name()}, warm page cache")
    print("| load | seconds | peak host anon GiB | peak host file-backed GiB | peak GPU GiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["mode"] == "ours-phases":
            continue
        label = {"ours": "ours", "reference": "reference-style", "ours-generate": "ours, 2 shards -> 1 GPU"}[r["mode"]]
        print(f"| {r['ckpt']} {label} | {r['seconds']:.2f} | {r['host_anon_gib']:.1f} | {r['host_file_gib']:.1f} | "
              f"{r['gpu_peak_gib']:.1f} |")
    ours = min(r["seconds"] for r in rows if r["mode"] == "ours")
    ref = min(r["seconds"] for r in rows if r["mode"] == "reference")
    print(f"7B: ours {ours:.2f} s vs reference-style {ref:.2f} s: {ref / ours:.1f}x faster")
    print("7B, Llama.build step by step (s):", rows[-1]["phases"])


if __name__ == "__main__":
    main()
