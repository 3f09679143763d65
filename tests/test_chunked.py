"""The chunked torch backend's recompute backward against float64: both layouts (token chunks, vocab slices),
the CUDA operand path (half-precision dlogits into GEMMs with fp32 accumulation) emulated on CPU, and the
rules that choose chunk sizes and layouts. Gradients pass, row by row, when their error against float64 is at most 3
times the error of the naive same-dtype computation plus a small floor (`assert_within`, as in
test_linear_logprobs.py): a bound relative to a tensor's largest entry would let a bf16 softmax be off by 2%."""
import pytest
import torch

from rpo_fast import chunked, gemm
from rpo_fast.chunked import chunked_linear_logprobs_bwd, chunked_linear_logprobs_fwd
from conftest import max_abs_err
from rpo_reference_math import assert_within, logprobs64, naive_logprobs


def inputs(N, H, V, dtype, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) * 2 / H**0.5).to(dtype)
    b = torch.randn(V, generator=gen).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.rand(N, generator=gen) < 0.2] = -100
    g = torch.randn(N, generator=gen)
    return hidden, weight, b, targets, g


def exact_grads(hidden, weight, b, targets, g, logprobs=logprobs64):
    """Gradients of sum(g * lp) from `logprobs` (logprobs64: float64 leaves; naive_logprobs: same-dtype leaves)."""
    leaves = [(t.double() if logprobs is logprobs64 else t.clone()).requires_grad_() if t is not None else None
              for t in (hidden, weight, b)]
    (logprobs(*leaves, targets) * g.double()).sum().backward()
    return [t.grad if t is not None else None for t in leaves]


def check(grads, hidden, weight, b, targets, g, dtype):
    exact = exact_grads(hidden, weight, b, targets, g)
    naive = exact_grads(hidden, weight, b, targets, g, logprobs=naive_logprobs)
    for name, got, ref, naive_grad in zip(("d_hidden", "d_weight", "d_bias"), grads, exact, naive):
        if ref is None:
            assert got is None, name
            continue
        assert_within(name, got, ref, naive_grad, dtype, min_scale=1e-3, rowwise=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("layout,size", [("tokens", 7), ("vocab", 13), ("vocab", 301), ("vocab", 1)])
def test_layouts_match_float64(layout, size, dtype, bias):
    N, H, V = 45, 19, 97
    hidden, weight, b, targets, g = inputs(N, H, V, dtype, bias)
    lp, lse = chunked_linear_logprobs_fwd(hidden, weight, b, targets, chunk_size=11)
    sizes = dict(chunk_size=size) if layout == "tokens" else dict(slice_size=size)
    grads = chunked_linear_logprobs_bwd(hidden, weight, b, targets, lse, g, layout=layout, **sizes)
    assert [t.dtype for t in grads if t is not None] == [dtype] * (3 if bias else 2)
    check(grads, hidden, weight, b, targets, g, dtype)


@pytest.mark.parametrize("layout", ["tokens", "vocab"])
def test_only_requested_grads(layout):
    hidden, weight, b, targets, g = inputs(20, 8, 33, torch.float32, bias=True)
    _, lse = chunked_linear_logprobs_fwd(hidden, weight, b, targets)
    exact = exact_grads(hidden, weight, b, targets, g)
    for needs in [(True, False, False), (False, True, False), (False, False, True)]:
        grads = chunked_linear_logprobs_bwd(hidden, weight, b, targets, lse, g, needs_grad=needs, layout=layout,
                                            slice_size=10)
        for need, got, ref in zip(needs, grads, exact):
            assert (got is not None) == need
            if need:
                assert max_abs_err(got, ref) <= 2e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["tokens", "vocab"])
def test_gradients_are_contiguous_whatever_the_inputs_strides(layout, dtype):
    """Column-major hidden and weight: contiguous gradients (what the op's fake implementation reports to
    torch.compile; the token layout's dhidden and the vocab layout's dweight kept the inputs' strides), right."""
    hidden, weight, b, targets, g = inputs(20, 8, 33, dtype, bias=True)
    hidden, weight = hidden.T.contiguous().T, weight.T.contiguous().T
    _, lse = chunked_linear_logprobs_fwd(hidden, weight, b, targets)
    grads = chunked_linear_logprobs_bwd(hidden, weight, b, targets, lse, g, layout=layout, chunk_size=7,
                                        slice_size=10)
    assert all(t.is_contiguous() for t in grads), [t.stride() for t in grads]
    check(grads, hidden, weight, b, targets, g, dtype)


@pytest.fixture
def tensor_core_products(monkeypatch):
    """The CUDA operand path on CPU: bf16 operands go to the GEMMs as they are and the products are fp32
    (emulated by upcasting, as an fp32-accumulating tensor-core GEMM computes them), so dlogits are cast to
    bf16 for the gradient GEMMs exactly as on a GPU."""
    def mm(a, b):
        return a.float() @ b.float()

    def addmm(acc, a, b):
        return acc.addmm_(a.float(), b.float())

    monkeypatch.setattr(gemm, "fp32_out_on_tensor_cores", lambda t: t.dtype in gemm.HALF_DTYPES)
    monkeypatch.setattr(gemm, "mm_f32", mm)
    monkeypatch.setattr(chunked, "addmm_f32_", addmm)


@pytest.mark.parametrize("layout", ["tokens", "vocab"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_half_operand_path_matches_float64(tensor_core_products, layout, bias):
    """bf16 operands with fp32 products (the CUDA path) against float64: log-probs to fp32 precision, every
    gradient row within the naive bf16 computation's error (a softmax scaled by 1.02 fails)."""
    hidden, weight, b, targets, g = inputs(45, 19, 97, torch.bfloat16, bias)
    lp, lse = chunked_linear_logprobs_fwd(hidden, weight, b, targets, chunk_size=11)
    # fp32 logits from bf16 operands: the log-probs are those of the bf16 inputs to fp32 precision
    ref_lp = logprobs64(hidden.double(), weight.double(), None if b is None else b.double(), targets)
    assert max_abs_err(lp, ref_lp) <= 1e-5 * max(1.0, ref_lp.abs().max().item())
    grads = chunked_linear_logprobs_bwd(hidden, weight, b, targets, lse, g, layout=layout, chunk_size=11,
                                        slice_size=13)
    check(grads, hidden, weight, b, targets, g, torch.bfloat16)


def test_chunk_and_layout_rules(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert chunked.chunk_rows(128256, device=cuda) == chunked.MIN_CUDA_ROWS
    assert chunked.chunk_rows(1000, device=cuda) == chunked.CUDA_CHUNK_ELEMENTS // 1000
    assert chunked.chunk_rows(32000, device=cpu) == chunked.CHUNK_ELEMENTS // 32000
    assert chunked.chunk_rows(32000, chunk_size=5, device=cuda) == 5
    assert chunked.slice_rows(16384, device=cuda) == 4096 and chunked.slice_rows(100, slice_size=3) == 3
    assert chunked.choose_layout(16384, 128256, 4096, True, cpu) == "tokens"
    free = 40 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    # Llama-3-8B head: its 2 GiB fp32 dweight buffer fits a quarter of 40 GiB free; Gemma's 3 GiB not a quarter of 8
    assert chunked.choose_layout(16384, 128256, 4096, True, cuda) == "tokens"
    free = 8 * 2**30
    assert chunked.choose_layout(16384, 256000, 3072, True, cuda) == "vocab"
    assert chunked.choose_layout(16384, 256000, 3072, False, cuda) == "tokens"  # no dweight, no buffer
    assert chunked.choose_layout(300000, 256000, 3072, True, cuda) == "tokens"  # the [N, H] buffer is larger
    with pytest.raises(ValueError, match="layout"):
        chunked_linear_logprobs_bwd(*inputs(4, 3, 5, torch.float32, False)[:4], torch.zeros(4), torch.ones(4),
                                    layout="rows")
