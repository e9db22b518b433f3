"""Compiling ahead (`llama.kernels.ahead`): kernels launched inside compile instead of running,
and the real launches after it use what was compiled."""

import pytest
import torch

from llama import kernels
from llama.kernels import reference as R


def compiled(kernel) -> int:
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


def test_without_cuda_nothing_changes():
    x, w = torch.randn(2, 8), torch.randn(8)
    with kernels.compiling_ahead():
        y = kernels.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(y, R.rms_norm(x, w, 1e-5))


@pytest.mark.gpu
def test_compiles_ahead_then_runs_without_compiling():
    from llama.kernels import triton_kernels as T

    x = torch.randn(3, 328, device="cuda", dtype=torch.bfloat16)  # a width no other test uses
    w = torch.randn(328, device="cuda", dtype=torch.bfloat16)
    before = compiled(T._rms_norm_kernel)
    with kernels.compiling_ahead():
        T.rms_norm(x, w, 1e-5)
    assert compiled(T._rms_norm_kernel) == before + 1
    y = T.rms_norm(x, w, 1e-5)
    assert compiled(T._rms_norm_kernel) == before + 1  # the launch found it
    torch.testing.assert_close(y.float(), R.rms_norm(x, w, 1e-5).float(), rtol=2e-2, atol=2e-2)


def test_with_a_triton_too_old_launches_run_as_usual(monkeypatch):
    ahead = pytest.importorskip("llama.kernels.ahead")  # (needs Triton, not CUDA)
    monkeypatch.setattr(ahead, "_AsyncCompileMode", None)
    with ahead.compiling():
        assert not getattr(ahead._STATE, "ahead", False)  # launch() gives kernel[grid], as outside
