"""Head-sized matrix products with float32 results, on tensor cores where the device has them.

The head's products take bf16/fp16 operands (hidden [N, H], weight [V, H], logit gradients [N, V]) and must
give float32 results: logits in fp32 (so the log-softmax never sees bf16-rounded logits) and a weight
gradient accumulated in fp32 over many token chunks. On CUDA, `torch.mm(..., out_dtype=torch.float32)` and
`torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)` do that on tensor cores with fp32 accumulation
and no bf16 round trip. Older torch builds lack `out_dtype`, and some accumulate wrongly into `out` with
beta=1, so the first call on each CUDA device probes both on small tensors and falls back to upcast
products when the probe fails. On CPU (where `out_dtype` is not implemented for half operands) the
operands are upcast: fp32 products, the same values a GPU's fp32-accumulating GEMM approximates.
"""
from __future__ import annotations

import functools

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _cuda_out_dtype_works(device: str, dtype: torch.dtype) -> bool:
    """Whether mm/addmm with out_dtype=float32 run and accumulate correctly on this CUDA device."""
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(64, 48, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(48, 32, generator=gen).to(device=device, dtype=dtype)
        exact = a.double() @ b.double()
        prod = torch.mm(a, b, out_dtype=torch.float32)
        acc = torch.ones(64, 32, device=device, dtype=torch.float32)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        ok_mm = prod.dtype == torch.float32 and torch.allclose(prod.double(), exact, atol=1e-3, rtol=1e-3)
        ok_addmm = torch.allclose(acc.double(), exact + 1, atol=1e-3, rtol=1e-3)
        return bool(ok_mm and ok_addmm)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def fp32_out_on_tensor_cores(a: torch.Tensor) -> bool:
    """True when products of `a`'s dtype on its device can give fp32 results directly (CUDA, bf16/fp16)."""
    return a.device.type == "cuda" and a.dtype in HALF_DTYPES and _cuda_out_dtype_works(str(a.device), a.dtype)


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` as float32: a [M, K], b [K, N] of one float dtype -> [M, N] fp32."""
    if a.dtype == torch.float32:
        return a @ b
    if fp32_out_on_tensor_cores(a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`acc += a @ b` in place, accumulated in fp32: acc [M, N] fp32, a [M, K], b [K, N] of one float dtype."""
    if fp32_out_on_tensor_cores(a):
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    if a.dtype != torch.float32:
        a, b = a.float(), b.float()
    return acc.addmm_(a, b)
