"""The serving engine without HTTP: Llama's answers, alone and in a running batch; slots,
cancellation and the queue bound (float32, CPU)."""

import threading
import time

import pytest
import torch

from llama.chat_format import encode_dialog
from llama.engine import CANCELLED, LENGTH, STOP, Engine, QueueFull, Request
from llama.options import Options

PROMPTS = ["Hello world", "I believe the meaning of life is", "你好", "Once upon a time, in a land far away",
           "Simply put, the theory of relativity states that ", "1, 2, 3,", "北京有哪些值得去的地方？", "The"]


@pytest.fixture(scope="module")
def ref(ckpts, build):
    return build(ckpts["gqa1"], max_seq_len=128, max_batch_size=8)


@pytest.fixture(scope="module")
def engine(ckpts, build):
    with Engine(build(ckpts["gqa1"], max_seq_len=128, max_batch_size=8)) as eng:
        yield eng


def encode(llama_or_engine, text):
    return llama_or_engine.tokenizer.encode(text, bos=True, eos=False)


def run(engine, text, **options):
    return engine.submit(Request(encode(engine, text), Options(**options))).result()


def wait_until(cond, timeout=10.0):
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "timed out"
        time.sleep(0.01)


def assert_same(result, want, echo=False):
    """An engine Result equals a text_completion / chat_completion prediction with logprobs."""
    assert result.text == (want["generation"] if isinstance(want["generation"], str) else want["generation"]["content"])
    lps = want["logprobs"][1:] if echo else want["logprobs"]  # echo: BOS has no prediction
    assert len(result.logprobs) == len(lps)
    torch.testing.assert_close(result.logprobs, lps, rtol=0, atol=1e-4)


@pytest.mark.parametrize("echo", [False, True], ids=["plain", "echo"])
def test_greedy_equals_text_completion(engine, ref, echo):
    for prompt in PROMPTS[:4]:
        want = ref.text_completion([prompt], temperature=0, max_gen_len=40, logprobs=True, echo=echo)[0]
        got = run(engine, prompt, temperature=0, max_gen_len=40, logprobs=True, echo=echo)
        assert_same(got, want, echo)
        assert got.finish_reason == LENGTH and got.completion_tokens == 40
        assert got.prompt_tokens == len(encode(ref, prompt))


def test_chat_prompt_and_stop_strings_equal_llama(engine, ref):
    dialog = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "你好"}]
    want = ref.chat_completion([dialog], temperature=0, max_gen_len=30, logprobs=True)[0]
    got = engine.submit(Request(encode_dialog(engine.tokenizer, dialog), Options(temperature=0, max_gen_len=30,
                                                                                  logprobs=True))).result()
    assert_same(got, want)
    full = ref.text_completion([PROMPTS[1]], temperature=0, max_gen_len=30)[0]["generation"]
    stop = full[10:13]
    want = ref.text_completion([PROMPTS[1]], temperature=0, max_gen_len=30, logprobs=True, stop=stop)[0]
    got = run(engine, PROMPTS[1], temperature=0, max_gen_len=30, logprobs=True, stop=[stop, "never here"])
    assert_same(got, want)
    assert got.finish_reason == STOP and stop not in got.text and got.completion_tokens < 30


def test_stream_pieces_join_to_the_answer(engine, ref):
    handle = engine.submit(Request(encode(engine, PROMPTS[6]), Options(temperature=0, max_gen_len=40)))
    outputs = list(handle)
    assert outputs[-1].finish_reason == LENGTH and all(o.finish_reason is None for o in outputs[:-1])
    assert len(outputs) > 5 and not any("\ufffd" in o.text for o in outputs)
    want = ref.text_completion([PROMPTS[6]], temperature=0, max_gen_len=40)[0]["generation"]
    assert "".join(o.text for o in outputs) == want


def test_eight_concurrent_requests_each_equal_its_single_run(engine, ref):
    lengths = [5, 40, 17, 33, 1, 26, 12, 40]
    stops = [None, None, None, ",", None, None, "e", None]
    want = [ref.text_completion([p], temperature=0, max_gen_len=n, logprobs=True, stop=s)[0]
            for p, n, s in zip(PROMPTS, lengths, stops)]
    handles = engine.submit_many([Request(encode(engine, p), Options(temperature=0, max_gen_len=n, logprobs=True,
                                                                     stop=s))
                                  for p, n, s in zip(PROMPTS, lengths, stops)])
    for handle, w in zip(handles, want):
        assert_same(handle.result(), w)
    # and joining a batch that is already running
    first = engine.submit(Request(encode(engine, PROMPTS[3]), Options(temperature=0, max_gen_len=60)))
    next(iter(first))
    late = [engine.submit(Request(encode(engine, p), Options(temperature=0, max_gen_len=20))) for p in PROMPTS[:3]]
    assert first.result().text  # the rest of it
    for handle, p in zip(late, PROMPTS):
        assert handle.result().text == ref.text_completion([p], temperature=0, max_gen_len=20)[0]["generation"]


def test_prefill_budget_splits_the_admitted(engine, ref, monkeypatch):
    """Requests beyond the prefill budget wait for the next step's prefill; each answer is its
    single run's, with a repetition penalty (the engine then takes each step in) beside them."""
    import llama.engine as E

    monkeypatch.setattr(E, "PREFILL_TOKENS", 12)
    want = [ref.text_completion([p], temperature=0, max_gen_len=15)[0]["generation"] for p in PROMPTS]
    penalized = ref.text_completion([PROMPTS[0]], temperature=0, max_gen_len=15, repetition_penalty=1.3)[0]
    handles = engine.submit_many([Request(encode(engine, p), Options(temperature=0, max_gen_len=15)) for p in PROMPTS])
    extra = engine.submit(Request(encode(engine, PROMPTS[0]), Options(temperature=0, max_gen_len=15,
                                                                      repetition_penalty=1.3)))
    assert [h.result().text for h in handles] == want
    assert extra.result().text == penalized["generation"]


def test_sampling_controls_equal_llama(engine, ref):
    for kw in [dict(repetition_penalty=1.3), dict(top_k=5, repetition_penalty=1.1)]:
        want = ref.text_completion([PROMPTS[1]], temperature=0, max_gen_len=30, **kw)[0]["generation"]
        assert run(engine, PROMPTS[1], temperature=0, max_gen_len=30, **kw).text == want


def test_seeded_sampling_is_the_llama_draw(engine, ref):
    """A seed draws from the request's own RNG: the answer of Llama with that seed. Random
    weights give near-uniform distributions, where float rounding alone can move a draw, so
    the logits are sharpened (output weights x 4 in both models) for the comparison."""
    heads = [ref.model.output.weight, engine.llama.model.output.weight]
    for w in heads:
        w.mul_(4)
    try:
        for seed in (1, 2):
            want = ref.text_completion([PROMPTS[0]], max_gen_len=30, seed=seed)[0]["generation"]
            assert run(engine, PROMPTS[0], max_gen_len=30, seed=seed).text == want
        state = torch.get_rng_state()
        run(engine, PROMPTS[0], max_gen_len=5, seed=3)
        assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    finally:
        for w in heads:
            w.div_(4)


def test_nothing_to_generate(engine, ref):
    got = run(engine, PROMPTS[1], temperature=0, max_gen_len=0, logprobs=True, echo=True)
    want = ref.text_completion([PROMPTS[1]], temperature=0, max_gen_len=0, logprobs=True, echo=True)[0]
    assert_same(got, want, echo=True)
    got = run(engine, PROMPTS[1], max_gen_len=0)
    assert got.text == "" and got.finish_reason == LENGTH and got.completion_tokens == 0


def test_cancelling_frees_the_slots(engine, ref):
    long = Options(temperature=0, max_gen_len=120)
    handles = engine.submit_many([Request(encode(engine, p), long) for p in PROMPTS] * 2)  # 8 run, 8 wait
    wait_until(lambda: engine.stats()["running"] == 8)
    assert engine.stats()["waiting"] == 8
    for h in handles:
        h.cancel()
    wait_until(lambda: engine.stats() == {"running": 0, "waiting": 0, "free": 8})
    results = [h.result() for h in handles]
    assert all(r.finish_reason == CANCELLED for r in results)
    assert any(r.completion_tokens < 120 for r in results[:8])
    want = ref.text_completion([PROMPTS[2]], temperature=0, max_gen_len=20)[0]["generation"]
    assert run(engine, PROMPTS[2], temperature=0, max_gen_len=20).text == want  # the freed rows serve again


def test_bad_requests(engine):
    for prompt, match in [([], "empty"), ([1, 99999], "not token ids"), ([1] * 129, "longer than max_seq_len=128")]:
        with pytest.raises(ValueError, match=match):
            engine.submit(Request(prompt))
    with pytest.raises(ValueError, match="top_logprobs"):
        engine.submit(Request([1, 2], Options(logprobs=True), top_logprobs=21))
    with pytest.raises(ValueError, match="temperature must be 0 .greedy. or at least 1e-06"):
        engine.submit(Request([1, 2], Options(temperature=1e-300)))
    with pytest.raises(ValueError, match="repetition_penalty must be in"):
        engine.submit(Request([1, 2], Options(repetition_penalty=1e-300)))
    assert engine.ready


def test_queue_bound(ckpts, build):
    llama = build(ckpts["gqa1"], max_seq_len=128, max_batch_size=2)
    with Engine(llama, max_queue=1) as engine:
        long = Request(encode(engine, "Hello"), Options(temperature=0, max_gen_len=120))
        handles = engine.submit_many([long] * 3)
        with pytest.raises(QueueFull, match="all 2 slots are busy"):
            engine.submit(long)
        with pytest.raises(QueueFull):
            engine.submit_many([long, long])
        handles[0].cancel()
        wait_until(lambda: engine.stats()["waiting"] == 0)
        handles.append(engine.submit(long))
        for h in handles:
            h.cancel()
        assert all(h.result().finish_reason == CANCELLED for h in handles[1:])


def test_the_engine_holds_the_llama(ckpts, build):
    llama = build(ckpts["gqa1"], max_seq_len=64, max_batch_size=2)
    engine = Engine(llama).start()
    answers = []
    caller = threading.Thread(target=lambda: answers.append(llama.text_completion(["Hi"], max_gen_len=3)))
    caller.start()
    time.sleep(0.3)
    assert caller.is_alive() and not answers  # waits for the model
    engine.stop()
    caller.join(30)
    assert len(answers) == 1 and not engine.ready
    with pytest.raises(RuntimeError, match="not running"):
        engine.submit(Request([1, 2]))


def test_on_the_fast_path_too(ckpts, build, ref):
    with Engine(build(ckpts["gqa1"], max_seq_len=128, max_batch_size=8, fast=True)) as engine:
        handles = engine.submit_many([Request(encode(engine, p), Options(temperature=0, max_gen_len=30, logprobs=True))
                                      for p in PROMPTS])
        for handle, p in zip(handles, PROMPTS):
            assert_same(handle.result(), ref.text_completion([p], temperature=0, max_gen_len=30, logprobs=True)[0])


@pytest.mark.gpu
def test_cuda_graphs_alone_give_generate_s_tokens(ckpts, build):
    """bf16 at head size 128 (the Triton kernels, graphs replayed with per-row positions): a
    request alone runs the computation of `generate` on one prompt, so the same tokens."""
    kw = dict(max_seq_len=128, max_batch_size=8, device="cuda", dtype="bfloat16", fast=True)
    ref = build(ckpts["hd128"], **kw)
    with Engine(build(ckpts["hd128"], **kw)) as engine:
        for p in PROMPTS:
            want, _ = ref.generate([encode(ref, p)], max_gen_len=40, temperature=0)
            assert engine.submit(Request(encode(engine, p), Options(temperature=0, max_gen_len=40))).result().tokens \
                == want[0]


@pytest.mark.gpu
def test_cuda_graphs_concurrent_requests_equal_single_runs(ckpts, build):
    kw = dict(max_seq_len=128, max_batch_size=8, device="cuda", dtype="float32", fast=True)
    ref = build(ckpts["gqa1"], **kw)
    with Engine(build(ckpts["gqa1"], **kw)) as engine:
        assert engine.lockstep.decoder.cuda_graphs
        lengths = [5, 40, 17, 33, 1, 26, 12, 40]
        handles = engine.submit_many([Request(encode(engine, p), Options(temperature=0, max_gen_len=n, logprobs=True))
                                      for p, n in zip(PROMPTS, lengths)])
        for handle, p, n in zip(handles, PROMPTS, lengths):
            assert_same(handle.result(), ref.text_completion([p], temperature=0, max_gen_len=n, logprobs=True)[0])


@pytest.mark.gpu
def test_uploads_ring_keeps_every_list_while_the_device_lags():
    """Lists through the pinned ring, many times round it, each queued behind a long kernel:
    none is overwritten before its copy ran; a list longer than half the ring goes apart."""
    from llama.lockstep import Uploads

    up = Uploads(torch.device("cuda"), size=64)
    sent, got = [], []
    for i in range(200):
        if i % 50 == 0:
            torch.cuda._sleep(20_000_000)  # the copies below wait behind it
        values = list(range(i, i + 1 + i % 7))
        sent.append(values)
        got.append(up(values))
    big = list(range(100))
    assert up(big).tolist() == big
    assert [g.tolist() for g in got] == sent
    assert Uploads(torch.device("cpu"))([3, 1]).tolist() == [3, 1]


def test_uploads_ring_switches_halves_only_after_their_copies():
    """The ring's placement (the CUDA-free part): lists fill a half exactly, then the next
    goes to the other half, which is waited for first; nothing runs past the ring's end."""
    from llama.lockstep import Uploads

    class Event:
        def __init__(self, log, name):
            self.log, self.name = log, name

        def synchronize(self):
            self.log.append(f"wait {self.name}")

    log = []
    up = Uploads(torch.device("cpu"), size=64)
    up._record = lambda: Event(log, f"left {up._cur}")
    offsets = []
    for n in [8] * 4 + [8] * 4 + [8] + [30, 3]:
        at = up._place(n)
        assert at + n <= 64 and (at < 32) == (at + n <= 32)  # within one half
        offsets.append(at)
    assert offsets == [0, 8, 16, 24, 32, 40, 48, 56, 0, 32, 0]
    assert log == ["wait left 0", "wait left 1", "wait left 0"]
