"""Shared fixtures: the real Llama tokenizer and tiny random checkpoints in Meta's format."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama.tools.random_checkpoint import write_random_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER = str(FIXTURES / "tokenizer.model")
REPO = Path(__file__).parent.parent

# Shapes of the tiny models the tests build (vocab from the real tokenizer).
GQA = {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "norm_eps": 1e-5, "vocab_size": -1}
MHA = {"dim": 32, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-5, "vocab_size": -1}
WIDE = {"dim": 64, "multiple_of": 32, "n_heads": 8, "n_kv_heads": 4, "n_layers": 2, "norm_eps": 1e-5, "vocab_size": -1}
# Llama's head size (128), so the CUDA kernels for RoPE and attention run (GQA, 2 q heads a kv head)
HD128 = {"dim": 256, "multiple_of": 64, "n_heads": 2, "n_kv_heads": 1, "n_layers": 2, "norm_eps": 1e-5, "vocab_size": -1}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "multiproc" in item.keywords:  # several processes (torchrun): slow by nature
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def process_group_ends():
    """Builds in this process start a one-process group; it ends with the session."""
    from llama.distributed import shutdown

    yield
    shutdown()


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """Tiny checkpoints: the same GQA weights in 1, 2 and 4 shards; an MHA model; a wider GQA model."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for shards in (1, 2, 4):
        out[f"gqa{shards}"] = str(root / f"gqa-mp{shards}")
        write_random_checkpoint(out[f"gqa{shards}"], GQA, shards=shards, seed=1)
    out["mha"] = str(root / "mha")
    write_random_checkpoint(out["mha"], MHA, seed=2)
    for shards in (1, 2, 4):
        out[f"wide{shards}"] = str(root / f"wide-mp{shards}")
        write_random_checkpoint(out[f"wide{shards}"], WIDE, shards=shards, seed=3)
    out["hd128"] = str(root / "hd128")
    write_random_checkpoint(out["hd128"], HD128, seed=4)
    return out


@pytest.fixture(scope="session")
def build():
    """Llama.build with the test tokenizer, in float32 on CPU."""
    from llama import Llama

    def _build(ckpt_dir, max_seq_len=64, max_batch_size=4, **kw):
        kw.setdefault("dtype", "float32")
        kw.setdefault("device", "cpu")
        return Llama.build(ckpt_dir, TOKENIZER, max_seq_len=max_seq_len, max_batch_size=max_batch_size, **kw)

    return _build


@pytest.fixture(scope="session")
def gqa(ckpts, build):
    return build(ckpts["gqa1"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# LLAMA_TEST_MP_DEVICE=cuda runs the multi-process tests on GPUs with NCCL (one GPU a process).
MP_ON_CUDA = os.environ.get("LLAMA_TEST_MP_DEVICE", "cpu") == "cuda"


def torchrun_command(nproc: int, *args: str):
    """(command, environment) of `python -m torch.distributed.run` with `nproc` gloo processes
    on CPU (or, with LLAMA_TEST_MP_DEVICE=cuda, NCCL processes on GPUs; skipped when there are
    too few)."""
    if MP_ON_CUDA and nproc > torch.cuda.device_count():
        pytest.skip(f"needs {nproc} GPUs, {torch.cuda.device_count()} visible")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    if not MP_ON_CUDA:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return cmd, env


def torchrun(nproc: int, *args: str, timeout: int = 300, stdin=None) -> subprocess.CompletedProcess:
    """Runs `torchrun_command(nproc, *args)` to its end."""
    cmd, env = torchrun_command(nproc, *args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, stdin=stdin)
