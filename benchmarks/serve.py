"""Serving over HTTP with continuous batching, beside the static batch, on random weights of a real shape.

    python benchmarks/serve.py --model 7B [--clients 1,8,32,64] [--prompt_len 128] [--new_tokens 128]
                               [--soak 2000] [--disconnect 0.3] [--json out.json]
    python benchmarks/serve.py --model tiny --device cpu --clients 1,4 --soak 50     # a check, on a CPU

In one run: the static batch `generate` throughput at the largest client count (greedy, no
EOS, the same prompts and lengths); then the server (the engine and the FastAPI app under
uvicorn, in this process) with 1/8/32/64 concurrent streaming clients (serve_clients.py, in
another process), each sending `--requests` fixed-length prompts one after another for
fixed-length answers: aggregate tokens/s, time to first token and time between streamed
chunks (about one token each; p50 / p99), and the ratio of the largest count's aggregate to the static batch's (floor: 0.8).
Warm-up rounds are not timed. `--soak N`: N requests of random lengths from as many clients as slots, a
`--disconnect` fraction of them dropped by their client mid-stream; then no slot may be
held, GPU memory must be where it was, and every finished answer must be the model's greedy
answer: teacher-forced in one forward, each token's logit within `--tolerance` of the best
at its position (bf16 rounding differs between batch sizes, so exact equality with a lone
run is not what to ask of random weights).
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).parent))
from common import SHAPES, TOKENIZER, fast_decoder, no_eos, random_model  # noqa: E402

from llama import Llama  # noqa: E402
from llama.config import ModelArgs  # noqa: E402
from llama.distributed import choose_device, init_model_parallel, shutdown  # noqa: E402
from llama.engine import Engine, Request  # noqa: E402
from llama.options import Options  # noqa: E402
from llama.server import create_app  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32)
WORDS = "the of and to in is was for on that with as by at from his her an which or".split()
MODEL = "bench"


# --- clients ---

CLIENTS_PER_PROCESS = 16


def clients(url: str, jobs: list, concurrency: int) -> list:
    """Runs the jobs from `concurrency` concurrent clients (serve_clients.py) in other processes,
    at most CLIENTS_PER_PROCESS in each (one Python process reading 64 streams is slower than
    the server it measures; real clients are programs of their own); their records, in the
    jobs' order."""
    script = Path(__file__).parent / "serve_clients.py"
    n = max(1, min(-(-concurrency // CLIENTS_PER_PROCESS), len(jobs)))
    shares = [list(range(k, len(jobs), n)) for k in range(n)]
    procs = [subprocess.Popen([sys.executable, str(script), "--url", url, "--model", MODEL, "--concurrency",
                               str(len(range(k, concurrency, n)))], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(n)]
    for proc, share in zip(procs, shares):  # every process gets its jobs before any is read from
        proc.stdin.write(json.dumps([jobs[i] for i in share]))
        proc.stdin.close()
    records = [None] * len(jobs)
    for proc, share in zip(procs, shares):
        out, err = proc.stdout.read(), proc.stderr.read()
        if proc.wait():
            raise RuntimeError(f"serve_clients.py failed (exit {proc.returncode}):\n{err[-4000:]}")
        for i, rec in zip(share, json.loads(out)):
            records[i] = rec
    return records


# --- measurements ---

def percentile(xs, q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(records: list) -> dict:
    """Aggregate tokens/s (the usage's completion tokens) over the round's span; TTFT per
    request; time between chunks of text (each carries one token, unless the text of a token
    waits for the next one's, as a UTF-8 character split over byte tokens does)."""
    done = [r for r in records if r["times"]]
    tokens = sum(r["completion_tokens"] or 0 for r in done)
    span = max(r["end"] for r in done) - min(r["start"] for r in done)
    ttft = [r["times"][0] - r["start"] for r in done]
    tbt = [now - prev for r in done for prev, now in zip(r["times"], r["times"][1:])]
    return {"requests": len(done), "tokens": tokens, "tok_s": tokens / span,
            "ttft_ms": (1e3 * percentile(ttft, 50), 1e3 * percentile(ttft, 99)),
            "tbt_ms": (1e3 * percentile(tbt, 50), 1e3 * percentile(tbt, 99))}


def prompt_of(n_tokens: int, rng: random.Random = None) -> str:
    """A text of exactly n_tokens tokens with BOS (each ' word' is one token)."""
    words = [rng.choice(WORDS) for _ in range(n_tokens - 1)] if rng else ["the"] * (n_tokens - 1)
    return " ".join(words)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def static_rate(llama: Llama, bs: int, prompt_len: int, new_tokens: int, repeats: int = 3) -> float:
    """Tokens/s of `generate` over a static batch of bs fixed-length prompts (prefill included)."""
    prompts = [llama.tokenizer.encode(prompt_of(prompt_len), bos=True, eos=False)] * bs
    assert len(prompts[0]) == prompt_len
    llama.generate(prompts, max_gen_len=new_tokens, temperature=0)  # warm-up
    times = []
    for _ in range(repeats):
        sync(llama.device)
        t0 = time.perf_counter()
        llama.generate(prompts, max_gen_len=new_tokens, temperature=0)
        sync(llama.device)
        times.append(time.perf_counter() - t0)
    return bs * new_tokens / statistics.median(times)


def engine_rate(engine: Engine, tokenizer: Tokenizer, concurrency: int, n: int, prompt_len: int,
                new_tokens: int) -> float:
    """Tokens/s of the engine alone (no HTTP): n greedy requests, `concurrency` of them in flight,
    each finished one replaced by the next from its callback (in the engine's thread)."""
    prompt = tokenizer.encode(prompt_of(prompt_len), bos=True, eos=False)
    count = {"submitted": concurrency, "finished": 0, "tokens": 0}
    lock, done = threading.Lock(), threading.Event()

    def on_output(out):
        if out.finish_reason is None:
            return
        with lock:
            count["tokens"] += out.completion_tokens
            count["finished"] += 1
            more = count["submitted"] < n
            count["submitted"] += more
        if more:
            engine.submit(job)
        elif count["finished"] == n:
            done.set()

    job = Request(prompt, Options(temperature=0, max_gen_len=new_tokens), on_output=on_output)
    t0 = time.perf_counter()
    engine.submit_many([job] * concurrency)
    done.wait()
    return count["tokens"] / (time.perf_counter() - t0)


class Sampler:
    """Where this process's threads spend their time: every `interval` s, each thread's
    innermost frames (file:function) are counted, inclusive (a function counts when it is
    anywhere on the stack); the report lists each thread's most frequent ones. The sampling
    thread takes Python's lock too, so it slows what it measures a little."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.counts, self.samples = interval, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        me = threading.get_ident()
        names = {}
        while not self._stop.wait(self.interval):
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                if ident not in names:
                    names[ident] = next((t.name for t in threading.enumerate() if t.ident == ident), str(ident))
                name = names[ident]
                self.samples[name] = self.samples.get(name, 0) + 1
                seen = set()
                inner = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}:{frame.f_lineno}"
                own = self.counts.setdefault(name + " (innermost line)", {})
                own[inner] = own.get(inner, 0) + 1
                while frame is not None:
                    code = frame.f_code
                    key = f"{Path(code.co_filename).name}:{code.co_name}"
                    if key not in seen:
                        seen.add(key)
                        c = self.counts.setdefault(name, {})
                        c[key] = c.get(key, 0) + 1
                    frame = frame.f_back

    def report(self, top: int = 25) -> str:
        lines = []
        for name, n in sorted(self.samples.items(), key=lambda kv: -kv[1]):
            for label in (name, name + " (innermost line)"):
                lines.append(f"thread {label}: {n} samples")
                for key, c in sorted(self.counts[label].items(), key=lambda kv: -kv[1])[:top]:
                    lines.append(f"  {100 * c / n:5.1f}%  {key}")
        return "\n".join(lines)


class Serving:
    """The engine and the app under uvicorn in a thread of this process."""

    def __init__(self, llama: Llama, max_queue: int):
        self.engine = Engine(llama, max_queue).start()
        config = uvicorn.Config(create_app(self.engine, MODEL), host="127.0.0.1", port=0, log_level="warning",
                                access_log=False)
        sock = config.bind_socket()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.stop()


# --- soak ---

def token_id(tokenizer: Tokenizer, text: str) -> int:
    """The id of a token from its text in a logprobs answer (`llama.server.objects.token_text`)."""
    sp = tokenizer.sp_model
    if text.startswith("bytes:\\x"):
        return sp.piece_to_id(f"<0x{text[8:10].upper()}>")
    return sp.piece_to_id(text.replace(" ", "\u2581"))


@torch.inference_mode()
def greedy_deficits(llama: Llama, sequences: list, starts: list) -> list:
    """Per sequence, the largest (best logit - chosen token's logit) over its positions from
    starts[i] on, the tokens teacher-forced in one forward (rows right-padded)."""
    decoder, out = llama.decoder, []
    bs = llama.model.params.max_batch_size
    for k in range(0, len(sequences), bs):
        chunk = sequences[k : k + bs]
        length = max(len(s) for s in chunk)
        tokens = torch.zeros((len(chunk), length), dtype=torch.long, device=llama.device)
        for i, s in enumerate(chunk):
            tokens[i, : len(s)] = torch.tensor(s)
        positions = torch.arange(length, device=llama.device)[None]
        logits = decoder.step(tokens, positions, length, prefill=True, last_only=False)  # (b, length, vocab)
        for i, s in enumerate(chunk):
            start = starts[k + i]
            pred = logits[i, start - 1 : len(s) - 1]
            chosen = pred.gather(1, tokens[i, start : len(s), None])[:, 0]
            out.append(float((pred.max(-1).values - chosen).max()) if len(s) > start else 0.0)
    return out


def soak(llama: Llama, serving: Serving, n: int, disconnect: float, prompt_len: int, new_tokens: int,
         tolerance: float, seed: int = 0) -> dict:
    rng = random.Random(seed)
    jobs = []
    for _ in range(n):
        job = {"prompt": prompt_of(rng.randint(2, prompt_len), rng), "max_tokens": rng.randint(1, new_tokens),
               "logprobs": True}
        if rng.random() < disconnect:
            job["drop_after"] = rng.randint(1, job["max_tokens"])
        jobs.append(job)
    engine, device = serving.engine, llama.device
    sync(device)
    mem_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t0 = time.perf_counter()
    records = clients(serving.url, jobs, engine.max_batch_size)
    seconds = time.perf_counter() - t0
    end = time.time() + 10
    while engine.stats()["free"] < engine.max_batch_size and time.time() < end:
        time.sleep(0.05)
    stats = engine.stats()
    sync(device)
    mem_after = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    finished = [(job, r) for job, r in zip(jobs, records) if not r["dropped"] and r["finish"] == "length"]
    tok = llama.tokenizer
    prompts = [tok.encode(job["prompt"], bos=True, eos=False) for job, _ in finished]
    answers = [[token_id(tok, t) for chunk in r["tokens"] for t in chunk] for _, r in finished]
    wrong_length = sum(len(a) != job["max_tokens"] for a, (job, _) in zip(answers, finished))
    serving.close()  # the model is the check's now
    deficits = greedy_deficits(llama, [p + a for p, a in zip(prompts, answers)], [len(p) for p in prompts])
    return {"requests": n, "seconds": seconds, "dropped": sum(r["dropped"] for r in records),
            "finished": len(finished), "other_endings": sorted({r["finish"] for r in records if not r["dropped"]}
                                                             - {"length"}),
            "slots_held_after": stats["running"], "waiting_after": stats["waiting"],
            "gpu_bytes_leaked": mem_after - mem_before, "wrong_length": wrong_length,
            "worst_logit_deficit": max(deficits, default=0.0),
            "not_greedy": sum(d > tolerance for d in deficits), "tolerance": tolerance}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="7B", choices=list(SHAPES) + ["tiny"])
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--clients", default="1,8,32,64", help="concurrent streaming clients per round")
    p.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--soak", type=int, default=0, help="requests of the soak (0: none)")
    p.add_argument("--disconnect", type=float, default=0.3, help="fraction of soak requests dropped mid-stream")
    p.add_argument("--tolerance", type=float, default=0.5, help="soak: logit deficit allowed a greedy token")
    p.add_argument("--profile", action="store_true", help="then sample the threads' stacks in one more round")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    counts = [int(x) for x in a.clients.split(",")]
    device = choose_device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    init_model_parallel(1, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer = no_eos(Tokenizer(TOKENIZER))
    shape = TINY if a.model == "tiny" else SHAPES[a.model]
    args = ModelArgs(**shape, vocab_size=tokenizer.n_words, max_seq_len=a.prompt_len + a.new_tokens + 8,
                     max_batch_size=max(counts))
    model = random_model(args, dtype, device=device.type)
    llama = Llama(model, tokenizer, fast_decoder(model, dtype))
    llama.decoder.prepare()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    static = static_rate(llama, max(counts), a.prompt_len, a.new_tokens)
    print(f"{a.model} on {name}: static batch {max(counts)} generate: {static:.0f} tok/s", flush=True)
    serving = Serving(llama, max_queue=max(counts))
    job = {"prompt": prompt_of(a.prompt_len), "max_tokens": a.new_tokens}
    clients(serving.url, [job] * max(counts), max(counts))  # warm-up round, not timed
    alone = engine_rate(serving.engine, tokenizer, max(counts), max(counts) * a.requests, a.prompt_len,
                        a.new_tokens)
    print(f"engine alone (no HTTP), {max(counts)} in flight: {alone:.0f} tok/s", flush=True)
    rows = {}
    for c in counts:
        rows[c] = summarize(clients(serving.url, [job] * (c * a.requests), c))
        print(json.dumps({"clients": c, **rows[c]}), flush=True)
    if a.profile:
        with Sampler() as sampler:
            clients(serving.url, [job] * (max(counts) * a.requests), max(counts))
        print(f"where the server's threads were, {max(counts)} clients (sampled, not timed):")
        print(sampler.report(), flush=True)
    top = rows[max(counts)]["tok_s"]
    print()
    print(f"{a.model} on {name}; prompt {a.prompt_len} tokens, {a.new_tokens} new, greedy, streamed; "
          f"{a.requests} requests per client")
    print("| clients | aggregate tok/s | TTFT p50 / p99 ms | time between chunks p50 / p99 ms |")
    print("|---|---|---|---|")
    for c, r in rows.items():
        print(f"| {c} | {r['tok_s']:.0f} | {r['ttft_ms'][0]:.0f} / {r['ttft_ms'][1]:.0f} | "
              f"{r['tbt_ms'][0]:.1f} / {r['tbt_ms'][1]:.1f} |")
    print(f"| engine alone, {max(counts)} in flight (no HTTP) | {alone:.0f} | | |")
    print(f"| static batch {max(counts)} `generate` | {static:.0f} | | |")
    ratio = top / static
    print(f"{max(counts)} clients / static batch: {ratio:.2f}x ({'meets' if ratio >= 0.8 else 'BELOW'} the 0.8 floor)")
    result = {"device": name, "model": a.model, "static_tok_s": static, "engine_alone_tok_s": alone, "rounds": rows, "ratio": ratio}
    if a.soak:
        result["soak"] = s = soak(llama, serving, a.soak, a.disconnect, a.prompt_len, a.new_tokens, a.tolerance)
        print(json.dumps(s), flush=True)
        ok = (s["slots_held_after"] == 0 and s["waiting_after"] == 0 and s["gpu_bytes_leaked"] == 0
              and s["wrong_length"] == 0 and s["not_greedy"] == 0 and not s["other_endings"])
        print(f"soak: {s['requests']} requests ({s['dropped']} dropped mid-stream) in {s['seconds']:.0f} s: "
              f"{'OK' if ok else 'FAILED'}")
    else:
        serving.close()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    try:
        main()
    finally:
        shutdown()
