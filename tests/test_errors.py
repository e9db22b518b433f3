"""Bad input gets an exception whose message names the problem and the fix."""

import pytest

from llama import Llama


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda g: g.text_completion([]), ValueError, "no prompts given"),
        (lambda g: g.text_completion("just a string"), TypeError, "prompts must be a list of strings; got one str"),
        (lambda g: g.text_completion(["a", 3]), TypeError, "prompt 1 is a int, not a str"),
        (lambda g: g.text_completion(["a"] * 5), ValueError, "5 prompts but max_batch_size is 4"),
        (lambda g: g.text_completion(["word " * 100]), ValueError, r"prompt 0 is 10\d tokens, longer than max_seq_len=64"),
        (lambda g: g.text_completion(["a"], temperature=-0.1), ValueError, "temperature must be >= 0"),
        (lambda g: g.text_completion(["a"], top_p=0), ValueError, r"top_p must be in \(0, 1\]"),
        (lambda g: g.text_completion(["a"], top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
        (lambda g: g.text_completion(["a"], max_gen_len=-1), ValueError, "max_gen_len must be an int >= 0"),
        (lambda g: g.text_completion(["a"], seed=2**64), ValueError, r"seed must be an int in \[-2\*\*63, 2\*\*64\)"),
        (lambda g: g.generate([[]], max_gen_len=3), ValueError, "prompt 0 is empty"),
        (lambda g: g.generate([[1, 99999]], max_gen_len=3), ValueError, "not token ids"),
        (lambda g: g.chat_completion([]), ValueError, "no dialogs given"),
        (lambda g: g.chat_completion([[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]),
         ValueError, "dialog 0 .* must end with a 'user' message"),
        (lambda g: g.chat_completion([[{"role": "user", "content": "a"}], [{"role": "assistant", "content": "b"}]]),
         ValueError, "dialog 1 has roles"),
        (lambda g: g.chat_completion([[{"role": "user", "content": None}]]), TypeError, "content must be a str"),
    ],
)
def test_bad_requests(gqa, call, exc, match):
    with pytest.raises(exc, match=match):
        call(gqa)


def test_bad_build_arguments(ckpts, build, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Llama.build(ckpts["gqa1"], str(tmp_path / "tokenizer.model"), 64, 4, device="cpu")
    with pytest.raises(ValueError, match="max_seq_len must be a positive int"):
        build(ckpts["gqa1"], max_seq_len=0)
    with pytest.raises(ValueError, match="max_batch_size must be a positive int"):
        build(ckpts["gqa1"], max_batch_size=0)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        build(ckpts["gqa1"], dtype="float8")
    with pytest.raises(RuntimeError, match=r"needs 2 processes but 1 started: launch with `torchrun --nproc_per_node 2"):
        build(ckpts["gqa2"], model_parallel_size=2)


def test_memory_plan_refuses_what_cannot_fit(ckpts, build, monkeypatch):
    from llama import memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: 40 * 1024**2)
    with pytest.raises(MemoryError, match=r"needs .* GiB on cpu .* only 0.04 GiB is free. It would fit with: max_seq_len="):
        build(ckpts["gqa1"], max_seq_len=4096, max_batch_size=64)
