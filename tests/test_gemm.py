"""The fp32-result products of `rpo_fast.gemm` against float64, on the CPU path (upcast operands)."""
import pytest
import torch

from rpo_fast.gemm import addmm_f32_, fp32_out_on_tensor_cores, mm_f32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_products_are_fp32_and_match_float64(dtype):
    a = torch.randn(37, 53).to(dtype)
    b = torch.randn(53, 29).to(dtype)
    exact = a.double() @ b.double()
    prod = mm_f32(a, b)
    assert prod.dtype == torch.float32
    torch.testing.assert_close(prod.double(), exact, atol=1e-4, rtol=1e-5)
    acc = torch.full((37, 29), 0.5)
    out = addmm_f32_(acc, a, b)
    assert out.data_ptr() == acc.data_ptr() and acc.dtype == torch.float32
    torch.testing.assert_close(acc.double(), exact + 0.5, atol=1e-4, rtol=1e-5)


def test_cpu_never_claims_tensor_core_fp32_output():
    assert not fp32_out_on_tensor_cores(torch.zeros(2, 2, dtype=torch.bfloat16))
