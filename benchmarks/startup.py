"""What a user waits for, each run a fresh process: the example command end to end, the
first token, and the slowest step of a long answer.

    python benchmarks/startup.py --model 7B [--ckpt_dir /tmp/startup-7B] [--quantize int4]

Writes a random checkpoint of the shape (unless it exists) and reads it once so that it
is in the page cache, then times, in this order:
1. the reference-style run of the example chat (`benchmarks/reference_style.py`: Meta's way
   of loading, the faithful loop) under torchrun;
2. ours, `example_chat_completion.py` as written, under torchrun, with an empty start-up
   cache (first run on a machine), then again (later runs);
   then under plain python (no torchrun launcher), and under `benchmarks/timeline.py`
   (when each stage ended);
3. `benchmarks/first_token.py` with an empty cache, again, and with an empty cache and the
   kernels compiled one at a time (LLAMA_COMPILE_THREADS=1): seconds from process start to
   imported, built and first token, and every step of a 2000-token greedy generation
   (slowest / median).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SHAPES, TOKENIZER  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = ["--max_seq_len", "512", "--max_batch_size", "8"]


def timed(cmd, env, label):
    t0 = time.time()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    loaded = next((line for line in res.stdout.splitlines() if line.startswith("Loaded in")), "")
    print(f"{label}: {wall:.1f} s (rc {res.returncode}; {loaded})", flush=True)
    if res.returncode:
        print(res.stderr[-3000:], flush=True)
    prepared = [line for line in res.stderr.splitlines() if "prepared the fast decode path" in line]
    if prepared:
        print("   " + prepared[0], flush=True)
    return wall, res


def compile_bytecode(env) -> None:
    """Every module of the packages the runs import, compiled where env's PYTHONPYCACHEPREFIX says."""
    import importlib.util

    dirs = [str(REPO / "llama"), str(REPO / "benchmarks")]
    for name in ("torch", "triton", "sentencepiece", "fairscale", "fire", "numpy"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            dirs.append(str(Path(spec.origin).parent))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *dirs], env=env, capture_output=True)
    print(f"bytecode of {len(dirs)} packages compiled into {env['PYTHONPYCACHEPREFIX']} in {time.time() - t0:.0f} s",
          flush=True)


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
            str(29500 + os.getpid() % 1000), *args]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="7B", choices=list(SHAPES))
    p.add_argument("--ckpt_dir", default=None)
    p.add_argument("--quantize", default=None, choices=["int8", "int4"])
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--skip_reference", action="store_true")
    p.add_argument("--bytecode", default=None, metavar="DIR",
                   help="for a Python whose installed packages have no bytecode files and may not write them: "
                        "compile them all into DIR first and run everything with PYTHONPYCACHEPREFIX=DIR, as "
                        "a pip-installed torch imports (pip writes the bytecode when it installs)")
    a = p.parse_args()
    ckpt = Path(a.ckpt_dir or f"/tmp/startup-{a.model}")
    if not (ckpt / "params.json").exists():
        shape = SHAPES[a.model]
        cmd = [sys.executable, "-m", "llama.tools.random_checkpoint", str(ckpt), "--device", "cuda"]
        for k, v in shape.items():
            cmd += [f"--{k}", str(v)]
        t0 = time.time()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        print(f"wrote {ckpt} in {time.time() - t0:.0f} s", flush=True)
    for f in ckpt.iterdir():  # into the page cache, as for a user who has run it before
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_CACHE_DIR", None)
    if a.bytecode:
        env["PYTHONPYCACHEPREFIX"] = a.bytecode
        compile_bytecode(env)
    results = {}
    if not a.skip_reference:
        results["reference"], _ = timed(torchrun("benchmarks/reference_style.py", "--ckpt_dir", str(ckpt),
                                                 "--tokenizer_path", TOKENIZER, *EXAMPLE), env,
                                        "reference-style example (torch.load, fp16 eager)")
    extra = ["--quantize", a.quantize] if a.quantize else []
    cache_dir = Path(tempfile.mkdtemp(prefix="llama-cache-"))
    env_cache = dict(env, LLAMA_CACHE=str(cache_dir))
    example = torchrun("example_chat_completion.py", "--ckpt_dir", str(ckpt), "--tokenizer_path", TOKENIZER,
                       *EXAMPLE, *extra)
    results["ours_first"], _ = timed(example, env_cache, "ours, example, first run (empty start-up cache)")
    results["ours_later"], _ = timed(example, env_cache, "ours, example, later run")
    direct = [sys.executable, "example_chat_completion.py", *example[example.index("example_chat_completion.py") + 1:]]
    results["ours_python"], _ = timed(direct, env_cache, "ours, example under plain python (no torchrun), later run")
    timeline = example[:]
    timeline.insert(timeline.index("example_chat_completion.py"), "benchmarks/timeline.py")
    env_t = dict(env_cache, LAUNCH_T=repr(time.time()))
    wall, res = timed(timeline, env_t, "ours, example under benchmarks/timeline.py, later run")
    line = next((x for x in res.stderr.splitlines() if x.startswith("MARKS ")), None)
    if line:
        stages = dict(json.loads(line[6:]), **{"launcher ended": wall})
        print("   timeline (s since torchrun started): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()),
              flush=True)
    shutil.rmtree(cache_dir)
    marks = {}
    cache_dir = Path(tempfile.mkdtemp(prefix="llama-cache-"))
    env_cache = dict(env, LLAMA_CACHE=str(cache_dir))
    serial_dir = Path(tempfile.mkdtemp(prefix="llama-cache-"))
    runs = {"first": env_cache, "later": env_cache,
            "first, kernels compiled one at a time": dict(env, LLAMA_CACHE=str(serial_dir), LLAMA_COMPILE_THREADS="1")}
    for run, env_run in runs.items():
        t0 = time.time()
        res = subprocess.run([sys.executable, "benchmarks/first_token.py", "--ckpt_dir", str(ckpt), "--tokens",
                              str(a.tokens), *extra], cwd=REPO, env=env_run, capture_output=True, text=True)
        spawn = time.time() - t0
        line = next((x for x in res.stdout.splitlines() if x.startswith("MARKS ")), None)
        if line is None:
            print(res.stderr[-3000:])
            continue
        m = json.loads(line[6:])
        steps = m.pop("step_ms")
        m["slowest_step_ms"], m["median_step_ms"] = max(steps), statistics.median(steps)
        m["slowest_step_at"] = steps.index(max(steps))
        marks[run] = m
        print(f"first_token.py, {run} run: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()) +
              f" (process {spawn:.1f} s)", flush=True)
    shutil.rmtree(cache_dir)
    shutil.rmtree(serial_dir)
    print()
    print("| run | wall clock s | vs reference-style |")
    print("|---|---|---|")
    ref = results.get("reference")
    for key, label in (("reference", "reference-style example"), ("ours_first", "ours, first run"),
                       ("ours_later", "ours, later run"), ("ours_python", "ours, later run, plain python")):
        if key in results:
            ratio = f"1/{ref / results[key]:.1f}" if ref and key != "reference" else "-"
            print(f"| {label} | {results[key]:.1f} | {ratio} |")
    print()
    print("| run | imported s | built s | first token s | slowest / median step ms (at step) |")
    print("|---|---|---|---|---|")
    for run, m in marks.items():
        print(f"| {run} | {m['imported']:.2f} | {m['built']:.2f} | {m['first_token']:.2f} | "
              f"{m['slowest_step_ms']:.1f} / {m['median_step_ms']:.2f} ({m['slowest_step_at']}) |")


if __name__ == "__main__":
    main()
