"""Head-sized matrix products with float32 results, on tensor cores where the device has them.

The head's products take bf16/fp16 operands (hidden [N, H], weight [V, H], logit gradients [N, V]) and must
give float32 results: logits in fp32 (so the log-softmax never sees bf16-rounded logits) and a weight
gradient accumulated in fp32 over many token chunks. On CUDA, `torch.mm(..., out_dtype=torch.float32)` and
`torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)` do that on tensor cores with fp32 accumulation
and no bf16 round trip. Older torch builds lack `out_dtype`, and some refuse or mis-accumulate an fp32 `out`
with half operands, so the first call on each CUDA device probes both on small tensors. Where only the
in-place accumulation fails, the product still runs on tensor cores (`mm` with out_dtype) into a temporary of
at most `ACCUMULATE_ELEMENTS` fp32 elements, added to the accumulator slice by slice; only where `mm` with
out_dtype fails too are the operands upcast (fp32 products on CUDA cores: correct, many times slower). On
CPU (where `out_dtype` is not implemented for half operands) the operands are upcast: fp32 products, the
same values a GPU's fp32-accumulating GEMM approximates.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)


# The fallback accumulation's temporary: 2**26 fp32 elements (256 MiB), e.g. 16384 rows of a 4096-wide weight
# gradient, rows enough for the product to run at tensor-core speed.
ACCUMULATE_ELEMENTS = 2**26


class _Probe(NamedTuple):
    mm: bool  # torch.mm(a, b, out_dtype=float32) runs and is right
    addmm_into_out: bool  # torch.addmm(acc, a, b, out_dtype=float32, out=acc) accumulates in place, right


@functools.lru_cache(maxsize=None)
def _probe_cuda(device: str, dtype: torch.dtype) -> _Probe:
    """What of mm/addmm with out_dtype=float32 runs and computes correctly on this CUDA device."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(64, 48, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(48, 32, generator=gen).to(device=device, dtype=dtype)
    exact = a.double() @ b.double()
    try:
        prod = torch.mm(a, b, out_dtype=torch.float32)
        ok_mm = prod.dtype == torch.float32 and torch.allclose(prod.double(), exact, atol=1e-3, rtol=1e-3)
    except (RuntimeError, TypeError, NotImplementedError):
        ok_mm = False
    try:
        acc = torch.ones(64, 32, device=device, dtype=torch.float32)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        ok_addmm = torch.allclose(acc.double(), exact + 1, atol=1e-3, rtol=1e-3)
    except (RuntimeError, TypeError, NotImplementedError):
        ok_addmm = False
    return _Probe(bool(ok_mm), bool(ok_mm and ok_addmm))


def fp32_out_on_tensor_cores(a: torch.Tensor) -> bool:
    """True when products of `a`'s dtype on its device can give fp32 results directly (CUDA, bf16/fp16)."""
    return a.device.type == "cuda" and a.dtype in HALF_DTYPES and _probe_cuda(str(a.device), a.dtype).mm


def accumulates_in_place(a: torch.Tensor) -> bool:
    """True when `addmm_f32_` with operands like `a` is one tensor-core addmm into the accumulator."""
    return fp32_out_on_tensor_cores(a) and _probe_cuda(str(a.device), a.dtype).addmm_into_out


def operand_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype in which the head's GEMMs take operands like `t`: its own where products of its dtype give fp32
    results (fp32, or bf16/fp16 on CUDA tensor cores), else float32 (bf16/fp16 on CPU: fp32 products)."""
    return t.dtype if t.dtype == torch.float32 or fp32_out_on_tensor_cores(t) else torch.float32


def gemm_operand(t: torch.Tensor) -> torch.Tensor:
    """`t` in `operand_dtype(t)`: itself, or (bf16/fp16 on CPU) one fp32 copy for a whole call (for the weight
    [V, H]: 4*V*H bytes) rather than one per chunk inside `mm_f32`."""
    return t.to(operand_dtype(t))


def logits_f32(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 [rows, V'] logits of hidden rows h [rows, H] against weight rows w [V', H], plus `bias` [V'] (added in
    place) or None. The one logits product of both fused-head backends (`rpo_fast.chunked`, `rpo_fast.fwdgrad`),
    so that a policy and a reference scored by the two differ by their inputs alone: fp32 products of
    half-precision operands on CUDA tensor cores; elsewhere the operands in fp32 (a transient fp32 copy of
    half-precision operands not already given as `gemm_operand`s), where half-precision products rounded to
    their dtype would shift every half-precision log-prob."""
    logits = mm_f32(h, w.T)
    return logits if bias is None else logits.add_(bias)


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` as float32: a [M, K], b [K, N] of one float dtype -> [M, N] fp32."""
    if a.dtype == torch.float32:
        return a @ b
    if fp32_out_on_tensor_cores(a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`acc += a @ b` in place, accumulated in fp32: acc [M, N] fp32, a [M, K], b [K, N] of one float dtype."""
    if accumulates_in_place(a):
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    if fp32_out_on_tensor_cores(a):  # tensor-core products, added slice by slice (module docstring)
        rows = max(1, ACCUMULATE_ELEMENTS // max(1, acc.shape[1]))
        for start in range(0, acc.shape[0], rows):
            acc[start:start + rows].add_(torch.mm(a[start:start + rows], b, out_dtype=torch.float32))
        return acc
    if a.dtype != torch.float32:
        a, b = a.float(), b.float()
    return acc.addmm_(a, b)
