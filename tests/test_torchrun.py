"""`python -m llama.torchrun`: torchrun's launcher with a library error in one line and the
rank's exit status, and no OMP_NUM_THREADS warning; each rank sets its own threads."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from llama import torchrun as launcher
from llama.build import physical_cores
from tests.conftest import REPO, TOKENIZER, free_port

pytestmark = [pytest.mark.multiproc]


def launch(module: str, nproc: int, *args: str, omp=None) -> subprocess.CompletedProcess:
    """`python -m MODULE --nproc_per_node N ...` on CPU, OMP_NUM_THREADS unset unless given."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    cmd = [sys.executable, "-m", module, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def test_a_library_error_ends_the_run_in_two_lines(tmp_path):
    res = launch("llama.torchrun", 2, "example_text_completion.py", "--ckpt_dir", str(tmp_path / "missing"),
                 "--tokenizer_path", TOKENIZER)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2, res.stderr  # no OMP_NUM_THREADS warning, no traceback, no failure report
    # the rank that failed first tells it (every rank fails here; off rank 0 it says which)
    assert re.match(rf"error( on rank \d)?: checkpoint directory {re.escape(repr(str(tmp_path / 'missing')))} does not exist",
                    lines[0]), lines[0]
    assert lines[1] in ("llama.torchrun: rank 0 exited with status 2", "llama.torchrun: rank 1 exited with status 2")


def test_a_crash_says_which_rank_and_keeps_its_traceback(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text("import os, time\nif os.environ['RANK'] == '1':\n    raise RuntimeError('boom')\ntime.sleep(30)\n")
    res = launch("llama.torchrun", 2, str(script))
    assert res.returncode == 1
    assert "RuntimeError: boom" in res.stderr and res.stderr.strip().endswith("llama.torchrun: rank 1 exited with status 1")
    assert "ChildFailedError" not in res.stderr and "Sending process" not in res.stderr


@pytest.mark.slow
def test_plain_torchrun_buries_the_error_whatever_the_rank_does(tmp_path):
    """Why the launcher: under torchrun itself a rank's exit status, os._exit or an error file
    change only the fields of its ~40-line report (and torchrun exits 1)."""
    res = launch("torch.distributed.run", 2, "example_text_completion.py", "--ckpt_dir", str(tmp_path / "missing"),
                 "--tokenizer_path", TOKENIZER)
    assert res.returncode == 1
    assert re.search(r"error( on rank \d)?: checkpoint directory", res.stderr) and "ChildFailedError" in res.stderr
    assert "OMP_NUM_THREADS" in res.stderr and len(res.stderr.splitlines()) > 30


@pytest.mark.slow
def test_ranks_set_their_own_threads(ckpts, tmp_path):
    out = tmp_path / "out.json"
    res = launch("llama.torchrun", 2, "tests/mp_worker.py", "--ckpt_dir", ckpts["gqa2"], "--tokenizer_path", TOKENIZER,
                 "--out", str(out), "--max_gen_len", "2", omp="7")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(out.read_text())["threads"] == max(1, physical_cores() // 2)  # not the 7 of the environment


def test_exit_status_of_signals():
    assert launcher.status_of(2) == 2 and launcher.status_of(-signal.SIGKILL) == 137
    assert launcher.describe(3, -signal.SIGKILL) == "rank 3 was killed by SIGKILL (out of memory?)"
    assert launcher.describe(0, -signal.SIGTERM) == "rank 0 was killed by SIGTERM"
