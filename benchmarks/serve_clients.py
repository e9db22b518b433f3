"""Load for an OpenAI-compatible server: concurrent streaming completion clients.

    python benchmarks/serve_clients.py --url http://127.0.0.1:8000 --model NAME --concurrency 64 < jobs.json

Reads a JSON list of jobs ({"prompt", "max_tokens", "logprobs": true to ask for each
token's logprob (then each chunk says which tokens it carries), "drop_after": chunks after
which the client hangs up, or absent}) from stdin; `--concurrency` clients take them in
turn, each streaming greedy completions with the usage at the end. Writes one record per
job to stdout, as JSON: the send time, each chunk's arrival time (and tokens, with
logprobs), the finish reason, the completion tokens the usage counted, whether the client
hung up, and the end time (perf_counter seconds of this process). Needs httpx only; runs apart from the server so that the
clients' Python does not share the server's.
"""

import argparse
import asyncio
import json
import sys
import time

import httpx


async def one_request(http: httpx.AsyncClient, url: str, model: str, job: dict) -> dict:
    body = {"model": model, "prompt": job["prompt"], "max_tokens": job["max_tokens"], "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    if job.get("logprobs"):
        body["logprobs"] = 0
    rec = {"start": time.perf_counter(), "times": [], "tokens": [], "finish": None, "dropped": False,
           "completion_tokens": None}
    async with http.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            rec["finish"] = f"http {response.status_code}"
        else:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    rec["completion_tokens"] = chunk["usage"]["completion_tokens"]
                if not chunk["choices"]:
                    continue
                choice = chunk["choices"][0]
                if choice["logprobs"]:
                    tokens = choice["logprobs"]["tokens"]
                    if tokens:
                        rec["times"].append(time.perf_counter())
                        rec["tokens"].append(tokens)
                elif choice["text"]:
                    rec["times"].append(time.perf_counter())
                rec["finish"] = choice["finish_reason"] or rec["finish"]
                if job.get("drop_after") is not None and len(rec["times"]) >= job["drop_after"]:
                    rec["dropped"] = True
                    break  # leaving the block closes the connection mid-stream
    rec["end"] = time.perf_counter()
    return rec


async def run(url: str, model: str, jobs: list, concurrency: int) -> list:
    queue: asyncio.Queue = asyncio.Queue()
    for i, job in enumerate(jobs):
        queue.put_nowait((i, job))
    records = [None] * len(jobs)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def client():
            while not queue.empty():
                i, job = queue.get_nowait()
                records[i] = await one_request(http, url, model, job)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return records


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True, help="the server's base URL (without /v1)")
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, required=True)
    a = p.parse_args()
    json.dump(asyncio.run(run(a.url, a.model, json.load(sys.stdin), a.concurrency)), sys.stdout)


if __name__ == "__main__":
    main()
