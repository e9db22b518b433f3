"""Model parallel under torchrun with gloo on CPU: any shard count on any fitting world size."""

import json

import pytest

from tests.conftest import TOKENIZER, torchrun

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def run(tmp_path, nproc, ckpt_dir, tag):
    out = tmp_path / f"{tag}.json"
    res = torchrun(nproc, "tests/mp_worker.py", "--ckpt_dir", ckpt_dir, "--tokenizer_path", TOKENIZER, "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def close(a, b):
    """Same tokens and text; logprobs equal to float32 rounding (all-reduce order differs)."""
    assert a["chat"] == b["chat"]
    for x, y in zip(a["text"], b["text"]):
        assert x["generation"] == y["generation"] and x["tokens"] == y["tokens"]
        assert max(abs(p - q) for p, q in zip(x["logprobs"], y["logprobs"])) < 1e-4


def test_two_shards_on_two_processes_match_one_shard_on_one(ckpts, tmp_path):
    single = run(tmp_path, 1, ckpts["gqa1"], "mp1")
    close(run(tmp_path, 2, ckpts["gqa2"], "mp2"), single)
    close(run(tmp_path, 2, ckpts["gqa1"], "1to2"), single)  # resharded at load
    close(run(tmp_path, 2, ckpts["gqa4"], "4to2"), single)


def test_two_shards_split_over_four_processes(ckpts, tmp_path):
    close(run(tmp_path, 4, ckpts["wide2"], "2to4"), run(tmp_path, 1, ckpts["wide1"], "wide1"))


def test_world_size_that_cannot_split_the_model(ckpts, tmp_path):
    res = torchrun(3, "tests/mp_worker.py", "--ckpt_dir", ckpts["gqa2"], "--tokenizer_path", TOKENIZER,
                   "--out", str(tmp_path / "x.json"))
    assert res.returncode != 0
    assert "cannot be split over 3 processes; it runs with --nproc_per_node in: 1, 2" in res.stderr
