"""Meta's on-disk format: shard merge/split, load-time resharding, clear errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from llama import checkpoint as ck
from llama.model import ModelArgs
from tests.conftest import FIXTURES, GQA
from tests.helpers import load_all, merge, rank_state, reshard


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_our_split_matches_metas_two_shard_fixture():
    whole = load_all(FIXTURES / "tiny-gqa")
    meta_mp2 = load_all(FIXTURES / "tiny-gqa-mp2")
    for ours, theirs in zip(reshard(whole, 2), meta_mp2):
        assert_same_state(ours, theirs)
    assert_same_state(merge(meta_mp2), whole[0])


def test_reshard_round_trip_is_bit_exact(ckpts):
    one = load_all(ckpts["gqa1"])
    four = reshard(one, 4)
    assert_same_state(reshard(reshard(four, 2), 1)[0], one[0])
    assert_same_state(reshard(load_all(ckpts["gqa2"]), 4)[3], load_all(ckpts["gqa4"])[3])


@pytest.mark.parametrize("rank, world", [(0, 2), (1, 2), (1, 4), (0, 1)])
def test_rank_state_cuts_from_any_shard_count(ckpts, rank, world):
    want = ck.load_shard(Path(ckpts[f"gqa{world}"]) / f"consolidated.{rank:02d}.pth")
    want.pop("rope.freqs")
    for src in ("gqa1", "gqa2", "gqa4"):
        assert_same_state(rank_state(load_all(ckpts[src]), rank, world), want)


def test_shard_counts_give_identical_output(ckpts, build):
    outs = []
    for name in ("gqa1", "gqa2", "gqa4"):
        llama = build(ckpts[name])
        outs.append(llama.text_completion(["Hello world", "Once upon a time"], temperature=0, max_gen_len=8, logprobs=True))
    assert outs[0] == outs[1] == outs[2]


def test_meta_fixtures_load_and_agree(build):
    a = build(str(FIXTURES / "tiny-gqa")).text_completion(["Hello"], temperature=0, max_gen_len=6)
    b = build(str(FIXTURES / "tiny-gqa-mp2")).text_completion(["Hello"], temperature=0, max_gen_len=6)
    assert a == b


def test_llama1_and_code_llama_params(ckpts, build, tmp_path):
    llama1 = build(ckpts["mha"])  # no n_kv_heads, as Llama 1
    assert llama1.model.params.kv_heads == llama1.model.params.n_heads
    code = tmp_path / "code"
    shutil.copytree(ckpts["gqa1"], code)
    params = dict(GQA, rope_theta=1000000.0, some_future_key=True)
    (code / "params.json").write_text(json.dumps(params))
    with pytest.warns(UserWarning, match="some_future_key"):
        llama = build(str(code))
    assert llama.model.params.rope_theta == 1e6
    base = build(ckpts["gqa1"]).text_completion(["Hello"], temperature=0, max_gen_len=6, logprobs=True)
    theta = llama.text_completion(["Hello"], temperature=0, max_gen_len=6, logprobs=True)
    assert base[0]["logprobs"] != theta[0]["logprobs"]


def test_save_refuses_to_overwrite(ckpts, tmp_path):
    with pytest.raises(ck.CheckpointError, match="is the input"):
        ck.save_checkpoint(load_all(ckpts["gqa1"]), GQA, ckpts["gqa1"], inputs=[ckpts["gqa1"]])
    with pytest.raises(ck.CheckpointError, match="already holds a checkpoint"):
        ck.save_checkpoint(load_all(ckpts["gqa1"]), GQA, ckpts["gqa2"])


def test_valid_world_sizes():
    assert ck.valid_world_sizes(ModelArgs(dim=4096, n_heads=32, vocab_size=32000), upto=16) == [1, 2, 4, 8, 16]
    args70 = ModelArgs(dim=8192, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3, vocab_size=32000)
    assert ck.valid_world_sizes(args70, upto=16) == [1, 2, 4, 8]


# -- errors --------------------------------------------------------------------------------------


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_and_empty_dirs(tmp_path, build):
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        build(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "params.json").write_text(json.dumps(GQA))
    with pytest.raises(ck.CheckpointError, match="no checkpoint files found"):
        build(str(tmp_path / "empty"))


def test_missing_or_bad_params(ckpts, tmp_path, build):
    d = copy_ckpt(ckpts["gqa1"], tmp_path / "c")
    (d / "params.json").unlink()
    with pytest.raises(ck.CheckpointError, match="params.json.* is missing"):
        build(str(d))
    (d / "params.json").write_text("{not json")
    with pytest.raises(ck.CheckpointError, match="not valid JSON"):
        build(str(d))


def test_truncated_shard(ckpts, tmp_path, build):
    d = copy_ckpt(ckpts["gqa2"], tmp_path / "c")
    shard = d / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ck.CheckpointError, match="consolidated.01.pth.*truncated or corrupt"):
        build(str(d))


def test_mismatched_shards(ckpts, tmp_path, build):
    d = copy_ckpt(ckpts["gqa2"], tmp_path / "c")
    shutil.copy(Path(ckpts["wide2"]) / "consolidated.01.pth", d / "consolidated.01.pth")
    with pytest.raises(ck.CheckpointError, match="shards do not match"):
        build(str(d))


def test_params_that_do_not_match_weights(ckpts, tmp_path, build):
    d = copy_ckpt(ckpts["gqa1"], tmp_path / "c")
    (d / "params.json").write_text(json.dumps(dict(GQA, n_kv_heads=4)))
    with pytest.raises(ck.CheckpointError, match="params.json does not match the weights"):
        build(str(d))
    (d / "params.json").write_text(json.dumps(dict(GQA, n_layers=3)))
    with pytest.raises(ck.CheckpointError, match="lack 9 weight"):
        build(str(d))


def test_world_size_that_does_not_divide(ckpts, build):
    with pytest.raises(ck.CheckpointError, match=r"cannot be split over 3 processes.*--nproc_per_node in: 1, 2"):
        ck.check_split(ck.open_checkpoint(ckpts["gqa2"]).args, 3, into="over 3 processes",
                       fix="it runs with --nproc_per_node in")


@pytest.mark.parametrize("lost", ["consolidated.01.pth", "consolidated.03.pth"])
def test_a_missing_last_shard_is_named_missing(ckpts, tmp_path, build, lost):
    """The last shard gone: no gap in the numbering, but every split weight is a whole fraction
    of what params.json says, and checklist.chk names the file."""
    src = ckpts["gqa2"] if lost == "consolidated.01.pth" else ckpts["gqa4"]
    d = copy_ckpt(src, tmp_path / "c")
    (d / lost).unlink()
    total = 2 if lost == "consolidated.01.pth" else 4
    want = rf"holds {total - 1} of the model's {total} shards: the missing shard\(s\) \({lost}, listed in checklist.chk\)"
    with pytest.raises(ck.CheckpointError, match=want):
        build(str(d))
    (d / "checklist.chk").unlink()  # without the checklist, still a missing shard, not a bad params.json
    with pytest.raises(ck.CheckpointError, match=rf"holds {total - 1} of the model's {total} shards"):
        build(str(d))


def test_a_gap_in_the_shard_numbers_is_named(ckpts, tmp_path, build):
    d = copy_ckpt(ckpts["gqa4"], tmp_path / "c")
    (d / "consolidated.00.pth").unlink()
    (d / "consolidated.02.pth").unlink()
    with pytest.raises(ck.CheckpointError, match=r"shard\(s\) consolidated.00.pth, consolidated.02.pth missing from "
                                                 r".*: the folder holds 2 of 4 shards"):
        build(str(d))
