"""The command-line tools: random_checkpoint, reshard, check."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama import checkpoint as ck
from llama.tools import check, reshard
from tests.conftest import FIXTURES, REPO, TOKENIZER
from tests.helpers import cli


def load_all(d):
    return [ck.load_shard(p) for p in ck.shard_paths(d)]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_random_checkpoint_cli(tmp_path):
    out = tmp_path / "rc"
    res = subprocess.run([sys.executable, "-m", "llama.tools.random_checkpoint", str(out), "--dim", "32", "--n_layers", "1",
                          "--n_heads", "4", "--n_kv_heads", "2", "--shards", "2", "--rope_theta", "1e6"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json"]
    params = json.loads((out / "params.json").read_text())
    assert params["vocab_size"] == -1 and params["rope_theta"] == 1e6 and params["n_kv_heads"] == 2
    shards = load_all(out)
    assert shards[0]["tok_embeddings.weight"].shape == (32000, 16) and shards[0]["output.weight"].shape == (16000, 32)
    assert "rope.freqs" in shards[0] and shards[0]["layers.0.attention.wq.weight"].dtype == torch.bfloat16


def test_reshard_matches_metas_shards(tmp_path):
    reshard.reshard_dir(FIXTURES / "tiny-gqa", 2, tmp_path / "mp2")
    for ours, meta in zip(load_all(tmp_path / "mp2"), load_all(FIXTURES / "tiny-gqa-mp2")):
        assert same(ours, meta)
    reshard.reshard_dir(FIXTURES / "tiny-gqa-mp2", 1, tmp_path / "mp1")
    assert same(load_all(tmp_path / "mp1")[0], load_all(FIXTURES / "tiny-gqa")[0])


def test_reshard_round_trip_bit_exact(ckpts, tmp_path):
    src = Path(ckpts["wide1"])  # 8 heads, 4 kv heads: splits into 1, 2 or 4
    reshard.reshard_dir(src, 4, tmp_path / "mp4")
    reshard.reshard_dir(tmp_path / "mp4", 2, tmp_path / "mp2")
    reshard.reshard_dir(tmp_path / "mp2", 1, tmp_path / "mp1")
    assert same(load_all(tmp_path / "mp1")[0], load_all(src)[0])
    assert same(load_all(tmp_path / "mp2")[1], load_all(ckpts["wide2"])[1])
    assert json.loads((tmp_path / "mp1" / "params.json").read_text()) == json.loads((src / "params.json").read_text())
    assert check.check(tmp_path / "mp4", TOKENIZER) == []  # its checklist.chk verifies


@pytest.mark.slow  # command lines in subprocesses
def test_reshard_cli_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "llama.tools.reshard", *args], capture_output=True, text=True,
                              cwd=REPO, timeout=120)

    res = run("--ckpt_dir", str(FIXTURES / "tiny-gqa"), "--shards", "3", "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "cannot be split into 3 shards (whole heads per shard); use one of: 1, 2" in res.stderr
    assert not (tmp_path / "x").exists()
    res = run("--ckpt_dir", str(FIXTURES / "tiny-gqa"), "--shards", "2", "--out", str(FIXTURES / "tiny-gqa-mp2"))
    assert res.returncode == 2 and "already holds a checkpoint" in res.stderr
    res = run("--ckpt_dir", str(tmp_path / "missing"), "--shards", "2", "--out", str(tmp_path / "y"))
    assert res.returncode == 2 and "does not exist" in res.stderr


@pytest.mark.parametrize(
    "params, name",
    [
        ({"dim": 4096, "n_layers": 32, "n_heads": 32, "norm_eps": 1e-05, "multiple_of": 256}, "Llama 2 7B"),
        ({"dim": 4096, "n_layers": 32, "n_heads": 32, "norm_eps": 1e-06, "multiple_of": 256}, "Llama 1 7B"),
        ({"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "norm_eps": 1e-05}, "Llama 2 70B"),
        ({"dim": 5120, "n_layers": 40, "norm_eps": 1e-05, "rope_theta": 1000000, "vocab_size": 32016}, "Code Llama 13B"),
    ],
)
def test_recognise(params, name):
    assert check.recognise(params) == name


def test_check_reports_problems(tmp_path, capsys):
    d = tmp_path / "c"
    reshard.reshard_dir(FIXTURES / "tiny-gqa", 2, d)
    assert check.main([str(d), "--tokenizer_path", TOKENIZER]) == 0
    out = capsys.readouterr().out
    assert "runs with --nproc_per_node (any of): 1, 2" in out and "md5 consolidated.01.pth: OK" in out

    shard = d / "consolidated.01.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10] + bytes(10))  # damaged bytes at the end: loads, md5 fails
    problems = check.check(d)
    assert any("consolidated.01.pth: md5" in p for p in problems)
    shard.write_bytes(data[: len(data) // 3])  # truncated
    (d / "checklist.chk").write_text("<html><body>Access denied</body></html>")
    problems = check.check(d)
    assert any("truncated or corrupt" in p for p in problems)
    assert any("not an md5 checklist" in p for p in problems)
    assert check.main([str(d)]) == 1


def test_check_takes_the_folder_as_ckpt_dir_or_alone(capsys):
    folder = str(FIXTURES / "tiny-gqa")
    assert check.main(["--ckpt_dir", folder, "--no-md5"]) == 0
    by_flag = capsys.readouterr().out
    assert check.main([folder, "--no-md5"]) == 0
    assert capsys.readouterr().out == by_flag and "OK: ready to run" in by_flag
    assert cli(check.main, folder, "--ckpt_dir", str(FIXTURES / "tiny-gqa-mp2")) == 2
    assert "give the checkpoint folder once" in capsys.readouterr().err
    assert cli(check.main) == 2


def test_check_names_a_missing_shard_first_without_a_tokenizer(tmp_path, capsys):
    d = tmp_path / "c"
    reshard.reshard_dir(FIXTURES / "tiny-gqa", 2, d)  # with its checklist.chk
    (d / "consolidated.01.pth").unlink()
    assert check.main([str(d)]) == 1
    problems = capsys.readouterr().err.split("PROBLEMS:")[1].strip().splitlines()
    assert problems[0].startswith(f"- the folder {str(d)!r} holds 1 of the model's 2 shards")
    assert not any("tokenizer" in p for p in problems)


@pytest.mark.slow  # command lines in subprocesses
@pytest.mark.parametrize("tool", ["llama.tools.check", "llama.tools.random_checkpoint"])
def test_output_into_a_closed_pipe_ends_quietly(tool, tmp_path):
    """`llama-check ... | head -1`: the reader goes away before the tool writes."""
    args = [str(FIXTURES / "tiny-gqa")] if tool.endswith("check") else [str(tmp_path / "rc"), "--dim", "16",
                                                                          "--n_layers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", tool, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=REPO)
    proc.stdout.close()  # before the child has started up
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""
    res = subprocess.run(f"{sys.executable} -m llama.tools.check {FIXTURES / 'tiny-gqa'} | head -1", shell=True,
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.stderr == "" and len(res.stdout.splitlines()) == 1
