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


class _FakeKernel:
    """Stands in for a Triton kernel: records its compile-only calls."""

    __name__ = "_fake_kernel"

    def __init__(self):
        self.warmups = []

    def warmup(self, *args, grid, **kwargs):
        self.warmups.append((args, kwargs))


def test_launches_are_noted_and_replayed_with_dtypes_for_tensors(monkeypatch):
    ahead = pytest.importorskip("llama.kernels.ahead")  # (needs Triton, not CUDA)
    kernel = _FakeKernel()
    x = torch.zeros(8, dtype=torch.bfloat16)
    with ahead.compiling(1):
        ahead.launch(kernel, (4,))(x, 16, 1e-5, None, BLOCK=64, FLAG=True)  # not noting: not noted
        with ahead.noting() as calls:
            ahead.launch(kernel, (4,))(x, 8, 1e-5, None, BLOCK=64, FLAG=True)
            ahead.launch(kernel, (4,))(x, 8, 1e-5, None, BLOCK=64, FLAG=True)  # the same launch: noted once
            ahead.launch(kernel, (4,))(x[1:], 7, 1e-5, None, BLOCK=64, FLAG=True)  # misaligned: not noted
            ahead.launch(kernel, (4,))(x, [1], 1e-5, None, BLOCK=64, FLAG=True)  # not a plain value: not noted
            assert calls == []  # (filled on leaving)
        ahead.launch(kernel, (4,))(x, 32, 1e-5, None, BLOCK=64, FLAG=True)  # after: not noted
    assert calls == [{"kernel": "_fake_kernel", "args": [{"dtype": "bfloat16"}, 8, 1e-5, None],
                      "kwargs": {"BLOCK": 64, "FLAG": True}}]
    assert len(kernel.warmups) == 6  # every launch still compiled

    class Module:
        _fake_kernel = _FakeKernel()

    corrupt = [{"kernel": "_gone_kernel", "args": [], "kwargs": {}}, {"args": 3}]
    assert ahead.replay(corrupt + calls, Module, 1) == 1
    assert Module._fake_kernel.warmups == [((torch.bfloat16, 8, 1e-5, None), {"BLOCK": 64, "FLAG": True})]


@pytest.mark.gpu
def test_replayed_launches_leave_nothing_to_compile():
    from llama.kernels import ahead
    from llama.kernels import triton_kernels as T

    x = torch.randn(5, 344, device="cuda", dtype=torch.bfloat16)  # a width no other test uses
    w = torch.randn(344, device="cuda", dtype=torch.bfloat16)
    with ahead.noting() as calls, kernels.compiling_ahead():
        T.rms_norm(x, w, 1e-5)
    noted = [c for c in calls if c["kernel"] == "_rms_norm_kernel" and 344 in c["args"]]
    assert len(noted) == 1
    for caches in T._rms_norm_kernel.device_caches.values():
        caches[0].clear()  # as in a new process (the compiled kernel stays in Triton's disk cache)
    assert ahead.replay(noted, T) == 1
    before = compiled(T._rms_norm_kernel)
    assert before == 1
    y = T.rms_norm(x, w, 1e-5)
    assert compiled(T._rms_norm_kernel) == before  # the real launch found the replayed kernel
    torch.testing.assert_close(y.float(), R.rms_norm(x, w, 1e-5).float(), rtol=2e-2, atol=2e-2)


def test_noted_launches_are_kept_in_the_start_up_cache(monkeypatch, tmp_path):
    ahead = pytest.importorskip("llama.kernels.ahead")  # (needs Triton, not CUDA)
    from llama import cache

    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setattr(kernels, "_triton", lambda: ahead)
    kernel = _FakeKernel()
    with kernels.noting_launches("launches-test"), ahead.compiling(1):
        ahead.launch(kernel, (1,))(torch.zeros(4), 4, BLOCK=16)
    assert cache.load_json("launches-test") == [{"kernel": "_fake_kernel", "args": [{"dtype": "float32"}, 4],
                                                 "kwargs": {"BLOCK": 16}}]
    with pytest.raises(ValueError), kernels.noting_launches("launches-failed"), ahead.compiling(1):
        ahead.launch(kernel, (1,))(torch.zeros(4), 8, BLOCK=16)
        raise ValueError("a failed prepare")
    assert cache.load_json("launches-failed") is None  # nothing kept after an error


def test_dependent_launches_only_for_kernels_that_wait(monkeypatch):
    ahead = pytest.importorskip("llama.kernels.ahead")
    waits, plain = _FakeKernel(), _FakeKernel()
    waits.arg_names = ["x_ptr", "BLOCK", "PDL"]
    monkeypatch.setattr(ahead, "_PDL", 1)
    with ahead.compiling(1):
        ahead.launch(waits, (1,))(torch.zeros(4), BLOCK=16)
        ahead.launch(plain, (1,))(torch.zeros(4), BLOCK=16)
    assert waits.warmups[0][1] == {"BLOCK": 16, "PDL": True, "launch_pdl": True}
    assert plain.warmups[0][1] == {"BLOCK": 16}
    monkeypatch.setattr(ahead, "_PDL", 0)
    with ahead.compiling(1):
        ahead.launch(waits, (1,))(torch.zeros(4), BLOCK=16)
    assert waits.warmups[1][1] == {"BLOCK": 16}
    if not torch.cuda.is_available():
        monkeypatch.setattr(ahead, "_PDL", None)
        assert ahead.pdl() == 0  # no GPU: plain launches


@pytest.mark.gpu
def test_dependent_launches_in_a_graph_give_the_plain_results():
    from llama.kernels import ahead
    from llama.kernels import triton_kernels as T

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launches need a Hopper GPU or later")
    torch.manual_seed(0)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16) / 64
    w2 = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
    g = torch.rand(4096, device="cuda", dtype=torch.bfloat16)

    def chain():  # each kernel reads what the one before it wrote
        h = T.gemv(x, w1, None, None, "float", True, norm=(g, 1e-5))
        y = T.gemv(T.rms_norm(h, g, 1e-5), w2, None, None, "float", False, residual=x)
        return T.rms_norm(y, g, 1e-5)

    try:
        ahead.set_pdl(0)
        plain = chain()
        ahead.set_pdl(1)
        assert ahead.pdl() == 1
        chain()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        for _ in range(3):
            out.zero_()
            graph.replay()
            torch.testing.assert_close(out, plain, rtol=0, atol=0)
    finally:
        ahead._PDL = None  # as the environment says again
