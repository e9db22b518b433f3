"""Batch-1 products of 16-bit weights on the CPU through compiled packages (llama.kernels.cpu_gemv)."""

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from llama import Llama
from llama.fast.modules import Linear
from llama.kernels import cpu_gemv
from tests.conftest import TOKENIZER


class Builders:
    """Stands in for the builder processes: records their commands, gives each a pid."""

    def __init__(self):
        self.started = []

    def __call__(self, cmd, env):
        self.started.append(cmd)
        return 4242


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache folder, no package loaded or pending, builders recorded (not run)."""
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_gemv, "_READY", {})
    monkeypatch.setattr(cpu_gemv, "_PENDING", {})
    builders = Builders()
    monkeypatch.setattr(cpu_gemv, "_start", builders)
    return builders


def test_pieces_are_the_fewest_short_enough():
    assert [cpu_gemv.pieces(k) for k in (64, 2048, 4096, 5632, 11008, 13824, 2049, 2053)] == [1, 1, 2, 4, 8, 8, 3, 2053]


def test_product_is_the_matmul():
    torch.manual_seed(0)
    x, w = torch.randn(1, 4096).bfloat16(), torch.randn(300, 4096).bfloat16()
    for split in (1, 2, 4):
        got = cpu_gemv.Product(split)(x, w)
        assert got.shape == (1, 300) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), x.float() @ w.float().T, rtol=1e-2, atol=0.1)


def test_missing_packages_are_built_in_the_background(fresh):
    w = torch.zeros(512, 2048, dtype=torch.bfloat16)
    small = torch.zeros(64, 64, dtype=torch.bfloat16)  # too small to want one
    cpu_gemv.prepare([w, w.float(), small])
    path = cpu_gemv.package_path(2048, torch.bfloat16)
    assert list(cpu_gemv._PENDING.values()) == [path] and not cpu_gemv.usable(torch.zeros(1, 2048).bfloat16(), w)
    assert len(fresh.started) == 1 and fresh.started[0][-1] == str(path)
    assert path.with_suffix(".building").read_text() == "4242"
    cpu_gemv.prepare([torch.zeros(300, 2048, dtype=torch.bfloat16)])  # the same width: nothing new
    assert len(fresh.started) == 1


def test_a_failed_build_is_said_once_and_not_retried(fresh, monkeypatch):
    w = torch.zeros(512, 2048, dtype=torch.bfloat16)
    path = cpu_gemv.package_path(2048, torch.bfloat16)
    path.parent.mkdir(parents=True)
    path.with_suffix(".failed").write_text("CppCompileError: no compiler\n")
    said = []
    monkeypatch.setattr("llama.distributed.log", said.append)
    cpu_gemv.prepare([w])
    cpu_gemv.prepare([w])
    assert not cpu_gemv._PENDING and len(said) == 1
    assert "no compiler" in said[0] and str(path.with_suffix(".failed")) in said[0]


def test_a_damaged_package_is_dropped_with_a_warning(fresh):
    w = torch.zeros(512, 2048, dtype=torch.bfloat16)
    path = cpu_gemv.package_path(2048, torch.bfloat16)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a package")
    with pytest.warns(UserWarning, match="unreadable package"):
        cpu_gemv.prepare([w])
    assert not path.exists() and list(cpu_gemv._PENDING.values()) == [path]


def test_bf16_cpu_builds_route_products_through_the_kernels(ckpts, monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path))
    ref = Llama.build(ckpts["gqa1"], TOKENIZER, 64, 2, device="cpu", dtype="float32")
    bf = Llama.build(ckpts["gqa1"], TOKENIZER, 64, 2, device="cpu", dtype="bfloat16")
    layer = bf.model.layers[0]
    assert isinstance(layer.attention.wq, Linear) and isinstance(bf.model.output, Linear)
    assert not isinstance(ref.model.layers[0].attention.wq, Linear)  # float32 stays as it was
    out = bf.text_completion(["Hello world"], max_gen_len=8, temperature=0)[0]["generation"]
    assert isinstance(out, str) and out


def test_a_package_that_fails_its_trial_is_never_used(fresh, monkeypatch):
    import subprocess

    import torch._inductor

    path = cpu_gemv.package_path(2048, torch.bfloat16)
    path.parent.mkdir(parents=True)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda program, package_path: open(package_path, "wb").write(b"built"))
    monkeypatch.setattr(cpu_gemv.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, -11, "", ""))
    with pytest.raises(RuntimeError, match="trial run"):
        cpu_gemv.build(2048, torch.bfloat16, path)
    assert not path.exists() and "signal 11" in path.with_suffix(".failed").read_text()
    assert not [p for p in path.parent.iterdir() if p.suffix == ".pt2"]  # no temporary left either


def test_a_lock_of_a_dead_builder_does_not_block(fresh, monkeypatch):
    path = cpu_gemv.package_path(2048, torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".building").write_text(str(os.getpid()))  # alive: this process
    cpu_gemv.prepare([torch.zeros(512, 2048, dtype=torch.bfloat16)])
    assert not fresh.started
    monkeypatch.setattr(cpu_gemv, "_PENDING", {})
    path.with_suffix(".building").write_text("999999999")  # no such process
    cpu_gemv.prepare([torch.zeros(512, 2048, dtype=torch.bfloat16)])
    assert len(fresh.started) == 1 and path.with_suffix(".building").read_text() == "4242"


@pytest.mark.slow
def test_a_built_package_loads_and_multiplies_any_rows(fresh):
    """The real thing: compile one width (about half a minute), load it as a later run would,
    and multiply weights of two row counts."""
    k = 512
    path = cpu_gemv.package_path(k, torch.bfloat16)
    path.parent.mkdir(parents=True)
    try:
        cpu_gemv.build(k, torch.bfloat16, path)
    except Exception as e:  # no C++ compiler here: said, and the products stay torch's
        pytest.skip(f"this machine cannot compile the package: {type(e).__name__}: {e}")
    assert path.exists() and not path.with_suffix(".building").exists()
    torch.manual_seed(0)
    x = torch.randn(1, k).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (4096, 5000):
            w = torch.randn(n, k).bfloat16()
            cpu_gemv.prepare([w])
            assert not cpu_gemv._PENDING and not cpu_gemv.usable(x, w)  # (autograd on: not here)
            with torch.inference_mode():
                assert cpu_gemv.usable(x, w)
                got = cpu_gemv.gemv(x, w)
            torch.testing.assert_close(got.float(), F.linear(x, w).float(), rtol=1e-2, atol=0.1)
