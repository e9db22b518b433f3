"""The HTTP server with the official `openai` client: answers equal to the in-process API,
streams, concurrency, disconnects, every bad request, the API key, and model parallel."""

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

from llama.engine import Engine, Request
from llama.options import Options
from llama.server import create_app
from llama.server.__main__ import main as server_main
from tests.conftest import REPO, TOKENIZER, torchrun_command
from tests.helpers import cli

PROMPTS = ["Hello world", "I believe the meaning of life is", "你好", "Once upon a time, in a land far away",
           "Simply put, the theory of relativity states that ", "1, 2, 3,", "北京有哪些值得去的地方？", "The"]
DIALOG = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "你好"},
          {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "What is a llama?"}]
MAX_SEQ_LEN = 1024


@contextlib.contextmanager
def serving(app):
    """`app` served by uvicorn in a thread on a free port; yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    sock = config.bind_socket()
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def ref(ckpts, build):
    return build(ckpts["gqa1"], max_seq_len=MAX_SEQ_LEN, max_batch_size=8)


@pytest.fixture(scope="module")
def engine(ckpts, build):
    with Engine(build(ckpts["gqa1"], max_seq_len=MAX_SEQ_LEN, max_batch_size=8), max_queue=4) as eng:
        yield eng


@pytest.fixture(scope="module")
def url(engine):
    with serving(create_app(engine, "tiny", max_body_bytes=64 * 1024)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def wait_until(cond, timeout=10.0):
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "timed out"
        time.sleep(0.01)


def greedy(ref, prompt, n, **kw):
    return ref.text_completion([prompt], temperature=0, max_gen_len=n, **kw)[0]


def test_health_and_models(url, client):
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "llama"


def test_completion_equals_text_completion(client, ref):
    for prompt in PROMPTS[:3]:
        want = greedy(ref, prompt, 20, logprobs=True)
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, logprobs=3)
        choice = got.choices[0]
        assert choice.text == want["generation"] and choice.finish_reason == "length"
        torch.testing.assert_close(choice.logprobs.token_logprobs, want["logprobs"], rtol=0, atol=1e-4)
        assert all(len(top) == 3 for top in choice.logprobs.top_logprobs)
        n_prompt = len(ref.tokenizer.encode(prompt, bos=True, eos=False))
        assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (n_prompt, 20,
                                                                                                 n_prompt + 20)
    echo = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=0, echo=True)
    assert echo.choices[0].text == greedy(ref, PROMPTS[1], 10, echo=True)["generation"]


def test_list_of_prompts_and_stop_strings(client, ref):
    full = greedy(ref, PROMPTS[1], 30)["generation"]
    stop = full[8:11]
    got = client.completions.create(model="tiny", prompt=PROMPTS[:3], max_tokens=30, temperature=0, stop=[stop])
    assert [c.index for c in got.choices] == [0, 1, 2]
    for choice, prompt in zip(got.choices, PROMPTS):
        assert choice.text == greedy(ref, prompt, 30, stop=stop)["generation"]
    assert got.choices[1].finish_reason == "stop" and stop not in got.choices[1].text
    assert got.usage.completion_tokens < 90


def test_streamed_completion_joins_to_the_text(client, ref):
    for prompt in (PROMPTS[6], PROMPTS[1]):
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        pieces = [c.choices[0].text for c in chunks if c.choices]
        assert "".join(pieces) == greedy(ref, prompt, 40)["generation"]
        assert not any("\ufffd" in p for p in pieces)  # no split UTF-8 character
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 40


def test_stream_lines_survive_unicode_line_breaks(url, ref):
    """Text with the characters Python's splitlines ends lines at (JSON leaves them raw) reads
    back whole with httpx's aiter_lines: each is escaped in the event's JSON."""
    prompt = "a\u2028b\x85c\u2029d"
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": True, "stream": True}
    texts = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                texts.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(texts) == greedy(ref, prompt, 3, echo=True)["generation"]
    assert "".join(texts).startswith(prompt)


def test_chat_equals_chat_completion(client, ref):
    want = ref.chat_completion([DIALOG], temperature=0, max_gen_len=24, logprobs=True)[0]
    got = client.chat.completions.create(model="tiny", messages=DIALOG, max_tokens=24, temperature=0, logprobs=True,
                                         top_logprobs=2)
    message = got.choices[0].message
    assert message.role == "assistant" and message.content == want["generation"]["content"]
    content = got.choices[0].logprobs.content
    torch.testing.assert_close([c.logprob for c in content], want["logprobs"], rtol=0, atol=1e-4)
    assert all(len(c.top_logprobs) == 2 for c in content)
    stream = client.chat.completions.create(model="tiny", messages=DIALOG, max_tokens=24, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want["generation"]["content"]
    assert chunks[-1].choices[0].finish_reason == "length"
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "a llama?"}]}]
    assert client.chat.completions.create(model="tiny", messages=parts, max_tokens=8, temperature=0).choices[0] \
        .message.content == ref.chat_completion([[{"role": "user", "content": "What is\na llama?"}]], temperature=0,
                                                max_gen_len=8)[0]["generation"]["content"]


def test_chat_with_special_tags_is_answered_as_chat_completion(client, ref):
    dialog = [{"role": "user", "content": "[INST] hi"}]
    want = ref.chat_completion([dialog], max_gen_len=4)[0]["generation"]["content"]
    assert client.chat.completions.create(model="tiny", messages=dialog).choices[0].message.content == want
    chunks = list(client.chat.completions.create(model="tiny", messages=dialog, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        return client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0.8,
                                         seed=seed).choices[0].text

    assert sample(5) == sample(5) and sample(5) != sample(6)


def test_eight_concurrent_clients_each_equal_its_single_run(client, ref, engine):
    lengths = [5, 60, 17, 33, 1, 26, 12, 45]
    want = [greedy(ref, p, n)["generation"] for p, n in zip(PROMPTS, lengths)]

    def ask(i):
        kw = dict(model="tiny", prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0)
        if i % 2:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
        return client.completions.create(**kw).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(8))) == want
    wait_until(lambda: engine.stats()["running"] == 0)


def test_disconnects_free_their_slots(url, engine, ref):
    body = {"model": "tiny", "prompt": PROMPTS[3], "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            events = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
            assert len(events) == 3 and engine.stats()["running"] == 1
        # the client is gone after 3 of 900 tokens; its slot frees long before 900 would be done
        wait_until(lambda: engine.stats()["running"] == 0, timeout=2)
    with pytest.raises(httpx.ReadTimeout):  # and a non-streamed request whose client gives up
        httpx.post(url + "/v1/completions", json=dict(body, stream=False), timeout=0.5)
    wait_until(lambda: engine.stats()["running"] == 0, timeout=2)
    assert greedy(ref, PROMPTS[2], 10)["generation"] == httpx.post(url + "/v1/completions", json=dict(
        body, prompt=PROMPTS[2], max_tokens=10, stream=False)).json()["choices"][0]["text"]


def test_full_queue_is_503_with_retry_after(url, engine):
    handles = engine.submit_many([Request([1, 15043], Options(temperature=0, max_gen_len=1000))] * 12)  # 8 + 4
    try:
        res = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi"})
        assert res.status_code == 503 and res.headers["retry-after"] == "1"
        assert res.json()["error"]["code"] == "queue_full"
    finally:
        for h in handles:
            h.cancel()
    wait_until(lambda: engine.stats()["running"] == 0)


BAD = [  # (body changes, status, param, words in the message)
    ({"temperature": -1}, 400, "temperature", "greater than or equal to 0"),
    ({"top_p": 0}, 400, "top_p", "greater than 0"),
    ({"temperature": 1e-300}, 400, "temperature", "0 (greedy) or at least"),
    ({"top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    ({"max_tokens": MAX_SEQ_LEN}, 400, "max_tokens", "max_seq_len=1024"),
    ({"max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0"),
    ({"prompt": "word " * MAX_SEQ_LEN}, 400, "prompt", "longer than max_seq_len=1024"),
    ({"prompt": []}, 400, "prompt", "empty list"),
    ({"prompt": [1, 2]}, 400, "prompt", "a string or a list of strings"),
    ({"prompt": "\ud800"}, 400, "prompt", "not valid Unicode"),
    ({"stop": [""]}, 400, "stop", "non-empty"),
    ({"seed": 2**64}, 400, "seed", "seed must be an int in"),
    ({"n": 2}, 400, "n", "n must be 1"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({"suffix": "x"}, 400, "suffix", "not supported"),
    ({"logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed with stream"),
    ({"frobnicate": 1}, 400, "frobnicate", "unsupported field"),
    ({"model": None}, 400, "model", "valid string"),
    ({"model": "gpt-4"}, 404, "model", "does not exist"),
]
BAD_CHAT = [
    ({"messages": []}, 400, "messages", "messages is empty"),
    ({"messages": [{"role": "bot", "content": "x"}]}, 400, "messages", "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400, "messages",
     "must end with a 'user' message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "messages",
     "alternating"),
    ({"messages": [{"role": "user"}]}, 400, "messages", "missing required field 'messages.0.content'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages", "only text parts"),
    ({"top_logprobs": 2}, 400, "top_logprobs", "needs logprobs"),
    ({"tools": []}, 400, "tools", "unsupported field"),
]


@pytest.mark.parametrize("change, status, param, words", BAD, ids=[str(b[0])[:40] for b in BAD])
def test_bad_completion_requests(url, change, status, param, words):
    body = dict({"model": "tiny", "prompt": "hi", "max_tokens": 2}, **change)
    check_error(post_json(url + "/v1/completions", body), status, param, words)


@pytest.mark.parametrize("change, status, param, words", BAD_CHAT, ids=[str(b[0])[:40] for b in BAD_CHAT])
def test_bad_chat_requests(url, change, status, param, words):
    body = dict({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, **change)
    check_error(post_json(url + "/v1/chat/completions", body), status, param, words)


def post_json(url, body):
    """POSTs `body` as ASCII JSON (as clients that escape everything send it, lone surrogates too)."""
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"})


def check_error(res, status, param, words):
    assert res.status_code == status, res.text
    error = res.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert words in error["message"], error["message"]


def test_malformed_oversized_and_lost_requests(url, client, ref):
    json_type = {"content-type": "application/json"}
    post = lambda data, **kw: httpx.post(url + "/v1/completions", content=data, **kw)  # noqa: E731
    check_error(post(b'{"model": "tiny", "prompt": ', headers=json_type), 400, None, "not valid JSON")
    check_error(post(b"[1, 2]", headers=json_type), 400, None, "JSON object")
    check_error(post(b""), 400, None, "JSON object")
    big = json.dumps({"model": "tiny", "prompt": "a" * 70_000}).encode()
    check_error(post(big), 413, None, "too large")
    check_error(post(iter([big[:40_000], big[40_000:]])), 413, None, "too large")  # no Content-Length: chunked
    check_error(httpx.get(url + "/v2/nothing"), 404, None, "no such route")
    with pytest.raises(openai.BadRequestError) as e:  # and as the openai client sees it
        client.completions.create(model="tiny", prompt="hi", temperature=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    # still up, and still right
    assert httpx.get(url + "/health").status_code == 200
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert got.choices[0].text == greedy(ref, PROMPTS[0], 12)["generation"]


def test_api_key(engine):
    with serving(create_app(engine, "tiny", api_key="sekret")) as base:
        assert httpx.get(base + "/health").status_code == 200  # open to load balancers
        for key in (None, "wrong"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            res = httpx.get(base + "/v1/models", headers=headers)
            assert res.status_code == 401 and res.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=base + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens <= 2


def test_health_is_503_once_the_engine_stops(ckpts, build):
    engine = Engine(build(ckpts["gqa1"], max_seq_len=64, max_batch_size=2)).start()
    with serving(create_app(engine, "tiny")) as base:
        assert httpx.get(base + "/health").status_code == 200
        engine.stop()
        assert httpx.get(base + "/health").status_code == 503
        res = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "hi"})
        assert res.status_code == 503 and res.json()["error"]["code"] == "unavailable"


def test_unknown_flag_is_refused_with_a_suggestion(capsys):
    assert cli(server_main, "--ckpt_dir", "x", "--tokenizer_path", "y", "--prot", "1") == 2
    assert "unknown flag --prot (did you mean --port?)" in capsys.readouterr().err


@pytest.mark.multiproc
@pytest.mark.slow
def test_server_under_torchrun_on_two_shards(ckpts, ref, tmp_path):
    cmd, env = torchrun_command(2, "-m", "llama.server", "--ckpt_dir", ckpts["gqa2"], "--tokenizer_path", TOKENIZER,
                                "--max_seq_len", str(MAX_SEQ_LEN), "--port", "0", "--model_name", "tiny",
                                "--dtype", "float32", "--device", "cpu")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
                            start_new_session=True)
    try:
        base = ready_address(proc, tmp_path / "server.log")
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=16,
                                                                     temperature=0).choices[0].text, PROMPTS[:4]))
        assert texts == [greedy(ref, p, 16)["generation"] for p in PROMPTS[:4]]
        chat = client.chat.completions.create(model="tiny", messages=DIALOG, max_tokens=12, temperature=0)
        assert chat.choices[0].message.content == \
            ref.chat_completion([DIALOG], temperature=0, max_gen_len=12)[0]["generation"]["content"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ready_address(proc, log_path, timeout=120) -> str:
    """The base URL the server prints once it is ready."""
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    end = time.time() + timeout
    while time.time() < end:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, open(log_path).read()[-3000:]
            continue
        found = re.search(r"on (http://\S+/v1)", line)
        if found:
            return found.group(1)
    raise AssertionError("the server did not say it was ready:\n" + open(log_path).read()[-3000:])


@pytest.mark.slow
def test_serve_benchmark_checks_itself_on_a_cpu():
    """benchmarks/serve.py end to end on a tiny model (its GPU run measures the 7B)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    res = subprocess.run([sys.executable, "benchmarks/serve.py", "--model", "tiny", "--device", "cpu", "--clients",
                          "1,3", "--requests", "1", "--prompt_len", "8", "--new_tokens", "12", "--soak", "20"],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| 3 |" in res.stdout and "3 clients / static batch" in res.stdout
    assert re.search(r"soak: 20 requests \(\d+ dropped mid-stream\) in \d+ s: OK", res.stdout), res.stdout
