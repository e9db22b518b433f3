"""llama.gemv: the few-row matrix product kernel behind the fast path on CUDA."""

import pytest
import torch
import torch.nn.functional as F

from llama import gemv


def test_cpu_products_go_to_torch():
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    x = torch.randn(1, 1, 32, dtype=torch.bfloat16)
    assert not gemv.usable(x, w)
    torch.testing.assert_close(gemv.linear(x, w), F.linear(x, w), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(96, 512), (100, 1000), (4096, 11008)])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_cuda_kernel_computes_the_product(dtype, n, k, rows):
    torch.manual_seed(0)
    w = (torch.randn(n, k, device="cuda") * 0.02).to(dtype)
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    want = x.float() @ w.float().t()
    got = gemv.mm(x, w)
    assert got.dtype == dtype and got.shape == (rows, n)
    torch.testing.assert_close(got.float(), want, atol=0.01 * want.abs().max().item(), rtol=0.01)


@pytest.mark.gpu
def test_cuda_kernel_is_only_taken_where_it_applies():
    w = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    assert gemv.usable(torch.randn(1, 1, 128, device="cuda", dtype=torch.bfloat16), w)
    assert not gemv.usable(torch.randn(2, 128, device="cuda", dtype=torch.bfloat16), w)  # cuBLAS is faster
    assert not gemv.usable(torch.randn(1, 128, device="cuda"), w.float())  # float32: cuBLAS
    assert not gemv.usable(torch.randn(1, 64, device="cuda", dtype=torch.bfloat16), w.t())  # not row-major
    for shape in ((1, 1, 128), (2, 3, 128)):
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(gemv.linear(x, w).float(), F.linear(x, w).float(), atol=0.05, rtol=0.01)
