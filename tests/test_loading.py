"""Weights reach their device intact, whatever the path."""

import pytest
import torch

from llama import loading


def items():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(300, 70, generator=gen).to(torch.bfloat16)
    return [
        ("contiguous", base),
        ("column_slice", base.narrow(1, 10, 35)),  # as a dim-1 shard cut
        ("vector", torch.randn(7, generator=gen).to(torch.bfloat16)),
        ("empty", torch.empty(0, 4, dtype=torch.bfloat16)),
    ]


def check(out, dtype):
    for key, cpu in items():
        assert out[key].dtype == dtype and out[key].shape == cpu.shape
        assert torch.equal(out[key].cpu(), cpu.to(dtype)), key


def test_cpu_same_dtype_keeps_the_mapped_tensor():
    src = items()
    out = loading.load_to_device(iter(src), torch.device("cpu"), torch.bfloat16)
    assert out["contiguous"].data_ptr() == src[0][1].data_ptr()
    check(loading.load_to_device(iter(items()), torch.device("cpu"), torch.float32), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_staging_across_chunk_boundaries(monkeypatch, dtype):
    monkeypatch.setattr(loading, "CHUNK_BYTES", 4096)  # many chunks per tensor, both buffers reused
    out = loading.load_to_device(iter(items()), torch.device("cuda"), dtype)
    assert out["contiguous"].device.type == "cuda"
    check(out, dtype)


def test_file_reads_give_the_mapped_tensors(ckpts, monkeypatch):
    from pathlib import Path

    from llama.checkpoint import load_shard

    monkeypatch.setattr(loading, "CHUNK_BYTES", 1 << 16)  # several chunks for the big tensors
    path = Path(ckpts["gqa2"]) / "consolidated.01.pth"
    state = load_shard(path)
    offsets = loading.tensor_offsets(path, state)
    assert offsets is not None and set(offsets) == set(state)
    out = loading.read_to_device(path, state, offsets, list(state), torch.device("cpu"), torch.float32)
    for k, t in state.items():
        assert torch.equal(out[k], t.float()), k


def test_offsets_refused_when_they_do_not_hold(ckpts, tmp_path):
    from pathlib import Path

    from llama.checkpoint import load_shard

    path = Path(ckpts["gqa1"]) / "consolidated.00.pth"
    other = load_shard(Path(ckpts["gqa2"]) / "consolidated.00.pth")
    assert loading.tensor_offsets(path, other) is None  # another file's tensors: the bytes differ


@pytest.mark.gpu
def test_build_on_cuda_reads_shards_directly(ckpts, build):
    from tests.conftest import TOKENIZER
    from llama import Llama

    cpu = build(ckpts["gqa1"])
    gpu = Llama.build(ckpts["gqa1"], TOKENIZER, 64, 4, device="cuda", dtype="float32", fast=False)
    for k, t in cpu.model.state_dict().items():
        assert torch.equal(gpu.model.state_dict()[k].cpu(), t), k
