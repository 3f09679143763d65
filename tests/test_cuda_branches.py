"""The fused head's CUDA-only branches, run on the CPU as far as the CPU can run them.

On a GPU the head takes bf16/fp16 operands straight into `torch.mm(..., out_dtype=torch.float32)` /
`torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)` (`rpo_fast.gemm`), forms bf16 dlogits for the
gradient GEMMs, and runs the per-row passes as Triton kernels. The CPU has no kernel for the out_dtype
products, so `cuda_products` stands in for them with the same checks and results (fp32 products of the
half-precision operands, as an fp32-accumulating tensor-core GEMM computes them) while the rest of the
branch runs as written; the Triton kernels run in the interpreter. On the meta device the real ATen ops
check the calls' schemas, shapes and dtypes.
"""
import pytest
import torch

import rpo_fast
from rpo_fast import chunked, gemm
from rpo_reference_math import logprobs64, random_pairs, rpo64
from test_head_backward import CASES, check_against_float64
from test_rpo_loss import triton_row_passes

HALF = (torch.bfloat16, torch.float16)


@pytest.fixture
def cuda_products(monkeypatch):
    """gemm's tensor-core branch for bf16/fp16 operands on the CPU. The out_dtype overloads of torch.mm and
    torch.addmm (CUDA-only kernels) get a CPU stand-in that checks what the CUDA kernels check (operands of
    one half dtype, fp32 out_dtype, an `out` of that dtype) and returns fp32 products of the operands."""
    real_mm, real_addmm = torch.mm, torch.addmm
    calls = []

    def check(a, b, out_dtype):
        assert a.dtype == b.dtype and a.dtype in HALF and out_dtype == torch.float32, (a.dtype, b.dtype, out_dtype)
        calls.append(tuple(a.shape) + tuple(b.shape[1:]))

    def mm(a, b, *args, out_dtype=None, **kwargs):
        if out_dtype is None:
            return real_mm(a, b, *args, **kwargs)
        check(a, b, out_dtype)
        return real_mm(a.float(), b.float())

    def addmm(acc, a, b, *args, out_dtype=None, **kwargs):
        if out_dtype is None:
            return real_addmm(acc, a, b, *args, **kwargs)
        check(a, b, out_dtype)
        out = kwargs.pop("out", None)
        assert not args and not kwargs and acc.dtype == torch.float32 and (out is None or out.dtype == out_dtype)
        return real_addmm(acc, a.float(), b.float(), out=out) if out is not None else real_addmm(acc, a.float(),
                                                                                                   b.float())

    on_tensor_cores = lambda t: t.dtype in HALF  # noqa: E731 - what a CUDA device with a working probe says
    monkeypatch.setattr(gemm, "fp32_out_on_tensor_cores", on_tensor_cores)
    monkeypatch.setattr(gemm, "accumulates_in_place", on_tensor_cores)
    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)
    return calls


@pytest.fixture
def row_kernels():
    """The forward-time-gradient head with the Triton row kernels (interpreted), as `fused_linear_rpo_loss`
    picks them for CUDA tensors."""
    with triton_row_passes(True) as calls:
        yield calls
    assert calls, "the forward-time-gradient head did not run"


@pytest.mark.parametrize("case", ["pairs-longer-than-the-chunk", "average_log_prob-several-chunks"])
def test_fwdgrad_head_in_its_cuda_configuration_against_float64(case, cuda_products, row_kernels):
    """bf16 GEMM operands with fp32 products, half-precision dlogits from the row kernels, fp32 dweight
    accumulation: loss and gradients within the bounds the CPU path meets (several chunks, pairs longer
    than a chunk, a reference head through the chunked recompute forward)."""
    check_against_float64(CASES[case]._replace(reference="head"), torch.bfloat16, "fwdgrad")
    assert cuda_products, "the tensor-core branch was not taken"


@pytest.mark.parametrize("layout", ["tokens", "vocab"])
def test_recompute_head_in_its_cuda_configuration_against_float64(layout, cuda_products, monkeypatch):
    """The recompute backward (chunked.py) with the same products, both layouts."""
    monkeypatch.setattr(chunked, "choose_layout", lambda *args: layout)
    check_against_float64(CASES["sigmoid-smoothed-weighted"], torch.bfloat16, "recompute")
    assert cuda_products


@pytest.mark.parametrize("backward", ["fwdgrad", "recompute"])
def test_bias_gradient_summed_before_the_half_cast(backward, cuda_products):
    """On CUDA the gradient GEMMs take bf16 dlogits; the bias gradient is their column sum in fp32 before that
    cast, in both heads (as the atomic kernel's fp32 sum): each entry within bf16's rounding of its float64
    value. A sum of bf16-rounded dlogits misses entries whose terms cancel (here by up to 30%)."""
    gen = torch.Generator().manual_seed(2)
    cu = random_pairs(4, 60, min_len=20, generator=gen)
    n = int(cu[-1])
    hidden = torch.randn(n, 16, generator=gen).bfloat16()
    weight = (torch.randn(64, 16, generator=gen) * 0.4).bfloat16()
    bias = (torch.randn(64, generator=gen) * 0.5).bfloat16()
    targets = torch.randint(0, 64, (n,), generator=gen)
    opts = dict(beta=0.3, alpha=0.7, sft_norm="token_mean", loss_type="sigmoid", label_smoothing=0.0,
                average_log_prob=False)
    leaf = bias.clone().requires_grad_()
    rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, bias=leaf, impl="torch", backward=backward,
                                   chunk_tokens=100, **opts).loss.backward()
    assert cuda_products, "the tensor-core branch was not taken"
    bias64 = bias.double().requires_grad_()
    r = rpo64(logprobs64(hidden.double(), weight.double(), bias64, targets), None, targets, cu, **opts)
    exact, = torch.autograd.grad(r["pref_loss"] + 0.7 * r["nll"], bias64)
    err = (leaf.grad.double() - exact).abs()
    bound = 2**-8 * exact.abs() + 1e-5 * exact.abs().max()
    assert bool((err <= bound).all()), float((err / exact.abs()).max())


def test_accumulation_without_addmm_into_out_stays_on_tensor_core_products(cuda_products, monkeypatch):
    """Where the probe finds mm with out_dtype working but not addmm into an fp32 `out`, the weight gradient
    is still accumulated from out_dtype products (slices of at most ACCUMULATE_ELEMENTS), not upcast ones."""
    monkeypatch.setattr(gemm, "accumulates_in_place", lambda t: False)
    monkeypatch.setattr(gemm, "ACCUMULATE_ELEMENTS", 40 * 29)
    a, b = torch.randn(97, 53).bfloat16(), torch.randn(53, 29).bfloat16()
    acc = torch.full((97, 29), 0.5)
    assert gemm.addmm_f32_(acc, a, b) is acc
    torch.testing.assert_close(acc.double(), a.double() @ b.double() + 0.5, atol=1e-4, rtol=1e-5)
    assert cuda_products == [(40, 53, 29), (40, 53, 29), (17, 53, 29)]  # three out_dtype products


# torch 2.11 and 2.12 decompose every addmm overload on meta with the plain addmm's formula, which binds
# out_dtype to beta (`TypeError: unsupported operand type(s) for *: 'torch.dtype' and 'Tensor'`); 2.13 gives
# addmm.dtype/dtype_out their own. Their CUDA kernels are separate and gemm probes them on the device.
_META_ADDMM_OUT_DTYPE_BROKEN = tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13)


@pytest.mark.xfail(_META_ADDMM_OUT_DTYPE_BROKEN, raises=TypeError, strict=True,
                   reason="torch < 2.13: the meta decomposition of addmm.dtype_out binds out_dtype to beta")
def test_out_dtype_products_on_meta(monkeypatch):
    """torch's real mm/addmm out_dtype overloads take gemm's calls with the head's operand layouts (a
    transposed dlogits block, the transposed weight) and give fp32 results, the accumulator in place."""
    monkeypatch.setattr(gemm, "fp32_out_on_tensor_cores", lambda t: t.dtype in HALF)
    monkeypatch.setattr(gemm, "accumulates_in_place", lambda t: t.dtype in HALF)
    meta = dict(device="meta", dtype=torch.bfloat16)
    h, w, dlogits = torch.empty(48, 32, **meta), torch.empty(96, 32, **meta), torch.empty(48, 96, **meta)
    logits = gemm.mm_f32(h, w.T)
    assert logits.shape == (48, 96) and logits.dtype == torch.float32
    acc = torch.empty(96, 32, device="meta")
    assert gemm.addmm_f32_(acc, dlogits.T, h) is acc
    with pytest.raises(RuntimeError):  # the meta kernels check shapes: a transposed operand left out fails
        gemm.mm_f32(h, w)
