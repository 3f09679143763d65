"""linear_logprobs: the Triton (interpreter), chunked torch and dense paths against float64, forward and
backward, across dtypes, irregular shapes, bias and ignored tokens. A path passes when its error is at
most 3 times the error of the naive same-dtype computation (logits in the input dtype, the rest in float64,
written in tests/rpo_reference_math.py) plus a small floor per dtype."""
import importlib

import pytest
import torch

import rpo_fast
import rpo_fast.chunked
from rpo_fast.chunked import chunked_linear_logprobs_bwd, chunked_linear_logprobs_fwd
from rpo_fast.kernels import TileConfig, linear_logprobs_bwd, linear_logprobs_fwd
from rpo_fast.live_memory import OutputRecorder
from conftest import max_abs_err
from rpo_reference_math import assert_within, logprobs64, naive_logprobs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, H, V): irregular (nothing divides a block), a single token and a one-entry tail tile, block-aligned.
SHAPES = [(70, 75, 301), (1, 8, 5), (64, 64, 256), (5, 3, 129)]


def make_inputs(N, H, V, dtype, bias, ignore_frac=0.2, scale=1.0, ignore_index=-100):
    hidden = (torch.randn(N, H) * scale).to(dtype)
    weight = (torch.randn(V, H) / H**0.5).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,))
    targets[torch.rand(N) < ignore_frac] = ignore_index
    return hidden, weight, b, targets


def grads_of(fn, hidden, weight, bias, targets, g):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    lp = fn(*leaves, targets)
    (lp.double() * g).sum().backward()
    return lp.detach(), [t.grad if t is not None else None for t in leaves]


def against_float64(hidden, weight, b, targets, g, fn, ignore_index=-100):
    """(log-probs, gradients) of `fn`, of the float64 reference and of the naive same-dtype computation."""
    as64 = [None if t is None else t.double() for t in (hidden, weight, b)]  # float64 leaves: unrounded gradients
    ref = grads_of(lambda *a: logprobs64(*a, ignore_index=ignore_index), *as64, targets, g)
    naive = grads_of(lambda *a: naive_logprobs(*a, ignore_index=ignore_index), hidden, weight, b, targets, g)
    return grads_of(fn, hidden, weight, b, targets, g), ref, naive


def judge(dtype, got, ref, naive, names=("d_hidden", "d_weight", "d_bias"), rowwise=True):
    (lp, grads), (ref_lp, ref_grads), (naive_lp, naive_grads) = got, ref, naive
    assert_within("logprobs", lp, ref_lp, naive_lp, dtype)
    for name, g, r, n in zip(names, grads, ref_grads, naive_grads):
        if r is not None:
            assert g.dtype == dtype and g.shape == r.shape, name
            assert_within(name, g, r, n, dtype, min_scale=1e-3, rowwise=rowwise)


# "triton" pairs the kernel forward with the op's default backward ("recompute": chunked torch); "triton-atomic"
# runs the Triton backward kernel (kernels/linear_logprobs_bwd.py) too.
@pytest.mark.parametrize("impl", ["triton", "triton-atomic", "torch", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_grads_match_float64(impl, dtype, bias, shape, monkeypatch):
    """Every forward and backward (the Triton backward kernel too) against float64, at every shape, dtype and bias."""
    impl, _, backward = impl.partition("-")
    monkeypatch.setattr(rpo_fast.chunked, "CHUNK_ELEMENTS", 16 * shape[2])  # torch: chunks of 16 tokens, one ragged
    hidden, weight, b, targets = make_inputs(*shape, dtype, bias)
    g = torch.randn(shape[0], dtype=torch.float64)
    got, ref, naive = against_float64(hidden, weight, b, targets, g,
                                      lambda h, w, bb, t: rpo_fast.linear_logprobs(h, w, t, bb, impl=impl,
                                                                                   backward=backward or "auto"))
    lp = got[0]
    assert lp.dtype == torch.float32 and lp.shape == (shape[0],)
    assert torch.all(lp[targets == -100] == 0)
    judge(dtype, got, ref, naive)


@pytest.mark.parametrize("impl,backward", [("torch", "recompute"), ("triton", "recompute"), ("triton", "atomic")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[1])
def test_ignore_index_other_than_minus_100(impl, backward, dtype, monkeypatch):
    """ignore_index=-1 reaches every forward and backward (the op's backward="atomic" is the Triton backward
    kernel): those tokens get log-prob 0 and no gradient, the rest match float64 (irregular shape, bias)."""
    monkeypatch.setattr(rpo_fast.chunked, "CHUNK_ELEMENTS", 16 * 83)  # torch: chunks of 16 tokens, one ragged
    hidden, weight, b, targets = make_inputs(37, 21, 83, dtype, bias=True, ignore_frac=0.3, ignore_index=-1)
    g = torch.randn(37, dtype=torch.float64)
    got, ref, naive = against_float64(
        hidden, weight, b, targets, g, ignore_index=-1,
        fn=lambda h, w, bb, t: rpo_fast.linear_logprobs(h, w, t, bb, ignore_index=-1, impl=impl, backward=backward))
    ignored = targets == -1
    assert 5 <= int(ignored.sum()) <= 32
    assert torch.all(got[0][ignored] == 0) and torch.all(got[1][0][ignored] == 0)
    judge(dtype, got, ref, naive)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_kernels_with_many_small_tiles_and_vocab_splits(dtype, monkeypatch):
    """Small blocks force many N/V/H tiles with ragged edges; splitting the vocabulary across programs
    (as on a GPU with few tokens) must merge to the same logsumexp."""
    fwd_module = importlib.import_module("rpo_fast.kernels.linear_logprobs_fwd")  # the package re-exports the name
    monkeypatch.setattr(fwd_module, "num_programs_wanted", lambda device: 16)
    hidden, weight, b, targets = make_inputs(37, 45, 203, dtype, bias=True)
    cfg = TileConfig(block_n=16, block_v=32, block_h=16)
    lp, lse = linear_logprobs_fwd(hidden, weight, b, targets, config=cfg)
    ref = logprobs64(hidden, weight, b, targets)
    logits64 = hidden.double() @ weight.double().T + b.double()
    assert max_abs_err(lse, torch.logsumexp(logits64, -1)) < 1e-4
    assert max_abs_err(lp, ref) < 1e-4

    g = torch.randn(37)
    grads = linear_logprobs_bwd(hidden, weight, b, targets, lse, g, config=cfg)
    _, ref, naive = against_float64(hidden, weight, b, targets, g.double(), logprobs64)
    judge(dtype, (lp, grads), ref, naive)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_chunked_path_matches_across_chunk_sizes(dtype):
    """Chunking changes nothing but the order of fp32 sums: log-probs and every gradient agree across chunk
    sizes to one rounding of the output dtype (a gradient accumulated across chunks in bf16/fp16 does not)."""
    hidden, weight, b, targets = make_inputs(50, 20, 97, dtype, bias=True)
    lp_all, lse_all = chunked_linear_logprobs_fwd(hidden, weight, b, targets, chunk_size=50)
    g = torch.randn(50)
    grads_all = chunked_linear_logprobs_bwd(hidden, weight, b, targets, lse_all, g, chunk_size=50)
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    # Two fp32 orders of the same sums differ by at most twice the classical bound of each: a logit's dot
    # product, (H + 2) eps32 sum_k |h_k w_k| (+ |b|), and the log of the V-term exp-sum, V eps32. A GEMM of
    # one row may take another kernel (another order) than a GEMM of many; which one is the machine's choice.
    n_h, n_v, eps32 = hidden.shape[1], weight.shape[0], torch.finfo(torch.float32).eps
    terms = hidden.float().abs() @ weight.float().abs().T + b.float().abs()
    lp_bound = 2 * eps32 * ((n_h + 2) * terms.max(dim=1).values + n_v)
    for chunk in (1, 7, 49):
        lp, lse = chunked_linear_logprobs_fwd(hidden, weight, b, targets, chunk_size=chunk)
        worst = ((lp - lp_all).abs() / lp_bound).max().item()
        assert worst <= 1, f"log-probs, chunks of {chunk}: off by {worst:.3g} times the fp32 reordering bound"
        grads = chunked_linear_logprobs_bwd(hidden, weight, b, targets, lse, g, chunk_size=chunk)
        for name, got, want in zip(("d_hidden", "d_weight", "d_bias"), grads, grads_all):
            got, want = got.double(), want.double()
            one_rounding = eps * torch.maximum(got.abs(), want.abs()) + tiny + (1e-6 if dtype == torch.float32 else 0)
            worst = ((got - want).abs() / one_rounding).max().item()
            assert worst <= 1, f"{name}, chunks of {chunk}: off by {worst:.3g} roundings of {dtype}"


class BackwardRecorder(OutputRecorder):
    """Records, while active, the `needs_grad` of each call of the head's backward op and every tensor of
    `shape` that a product or an allocation creates (inside the op too)."""

    MAKERS = ("mm", "matmul", "addmm", "zeros", "empty", "new_empty", "new_zeros", "empty_like", "zeros_like")

    def __init__(self, shape):
        super().__init__()
        self.shape, self.needs_grad, self.made = tuple(shape), [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.rpo_fast.linear_logprobs_bwd.default:
            self.needs_grad.append(list(args[-1]))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def record(self, func, out):
        if func.__name__.split(".")[0].rstrip("_") in self.MAKERS:
            self.made += [str(func) for t in (out if isinstance(out, (tuple, list)) else (out,))
                          if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape]


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_only_requested_grads_and_non_contiguous_inputs(impl):
    """A gradient nobody asked for is never computed: the backward op is told so, and no [N, H] product or buffer
    exists (with hidden requiring a gradient, the same recorder does see one)."""
    N, H, V = 20, 30, 50
    hidden, weight, _, targets = make_inputs(N, H, V, torch.float32, bias=False)
    w64 = weight.double().requires_grad_()
    logprobs64(hidden, w64, None, targets).sum().backward()
    for hidden_needs_grad in (False, True):
        hidden_t = hidden.T.contiguous().T.requires_grad_(hidden_needs_grad)  # column-major: a non-unit stride
        weight_leaf = weight.clone().requires_grad_()
        lp = rpo_fast.linear_logprobs(hidden_t, weight_leaf, targets, impl=impl)
        with BackwardRecorder((N, H)) as rec:
            lp.sum().backward()
        assert max_abs_err(weight_leaf.grad, w64.grad) < 1e-5
        assert rec.needs_grad == [[hidden_needs_grad, True, False]]
        assert bool(rec.made) == hidden_needs_grad, rec.made
        assert (hidden_t.grad is not None) == hidden_needs_grad


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_no_grad_forward_matches(impl):
    hidden, weight, b, targets = make_inputs(15, 9, 40, torch.float32, bias=True)
    with torch.no_grad():
        lp = rpo_fast.linear_logprobs(hidden, weight, targets, b, impl=impl)
    assert max_abs_err(lp, logprobs64(hidden, weight, b, targets)) < 1e-5


def test_auto_picks_torch_on_cpu():
    logprobs_module = importlib.import_module("rpo_fast.logprobs")
    assert logprobs_module.resolve_impl("auto", torch.device("cpu")) == "torch"
    assert logprobs_module.resolve_impl("auto", torch.device("cuda", 0)) == "triton"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gradient_filter_is_within_dtype_error_and_off_by_default(dtype, monkeypatch):
    """RPO_FAST_GRAD_FILTER=auto skips tiles with negligible softmax gradient (Cut Cross-Entropy's filter);
    peaked logits make many tiles skippable. Results stay within the float64 bound of the other tests."""
    monkeypatch.delenv("RPO_FAST_GRAD_FILTER", raising=False)
    hidden, weight, _, targets = make_inputs(40, 64, 2000, dtype, bias=False, scale=12.0)
    g = torch.randn(40, dtype=torch.float64)
    _, ref, naive = against_float64(hidden, weight, None, targets, g, logprobs64)
    cfg = TileConfig(block_n=16, block_v=64, block_h=64)
    lp, lse = linear_logprobs_fwd(hidden, weight, None, targets, config=cfg)
    exact = linear_logprobs_bwd(hidden, weight, None, targets, lse, g, needs_grad=(True, True, False), config=cfg)
    monkeypatch.setenv("RPO_FAST_GRAD_FILTER", "auto")
    filtered = linear_logprobs_bwd(hidden, weight, None, targets, lse, g, needs_grad=(True, True, False), config=cfg)
    assert any(not torch.equal(a, b) for a, b in zip(exact[:2], filtered[:2])), "the filter skipped no tile"
    # The filter drops whole tiles of negligible gradient: bounded against the tensor's largest entry, not row by row.
    judge(dtype, (lp, filtered[:2]), ref, naive, names=("d_hidden", "d_weight"), rowwise=False)
    monkeypatch.setenv("RPO_FAST_GRAD_FILTER", "often")
    with pytest.raises(ValueError, match="RPO_FAST_GRAD_FILTER"):
        linear_logprobs_bwd(hidden, weight, None, targets, lse, g, config=cfg)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "column-major"])
def test_custom_op_registration(impl, bias, layout):
    """Schema, fake (meta) outputs, autograd registration and AOT dispatch of the custom ops agree with their
    real outputs, strides included (torch.library.opcheck), so torch.compile can treat the fused head as one op.
    Column-major hidden and weight: the backward's gradients are contiguous, as its fake says (the chunked
    backward's dhidden used to keep hidden's strides, and inductor then crashed on a column-major hidden)."""
    from rpo_fast.logprobs import linear_logprobs_bwd, linear_logprobs_fwd

    hidden, weight, b, targets = make_inputs(23, 10, 37, torch.float32, bias=bias)
    if layout == "column-major":
        hidden, weight = hidden.T.contiguous().T, weight.T.contiguous().T
    hidden.requires_grad_()
    weight.requires_grad_()
    if b is not None:
        b.requires_grad_()
    results = torch.library.opcheck(linear_logprobs_fwd, (hidden, weight, b, targets, -100, impl))
    assert set(results.values()) == {"SUCCESS"}, results
    with torch.no_grad():
        lse = linear_logprobs_fwd(hidden, weight, b, targets, -100, impl)[1]
    args = (hidden.detach(), weight.detach(), None if b is None else b.detach(), targets, lse, torch.randn(23),
            -100, impl, [True, True, bias])
    results = torch.library.opcheck(linear_logprobs_bwd, args)
    assert set(results.values()) == {"SUCCESS"}, results


def test_inductor_compiles_the_op_on_a_column_major_hidden():
    """torch.compile's default backend over the op, with a hidden that is a transposed view of a tensor the graph
    makes: same gradients as eager (the backward's real dhidden used to keep the view's column-major strides
    where its fake says contiguous, and inductor's code read it with the wrong strides or failed)."""
    N, H, V = 6, 8, 20
    targets = torch.randint(0, V, (N,))
    base, weight = torch.randn(H, N), torch.randn(V, H)

    def f(base, w):
        lp = torch.ops.rpo_fast.linear_logprobs_fwd((base * 1.0).T, w, None, targets, -100, "torch")[0]
        return (lp * torch.arange(N)).sum()

    leaves = [t.clone().requires_grad_() for t in (base, weight)]
    expected = torch.autograd.grad(f(*leaves), leaves)
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(*leaves), leaves)
    for g, e in zip(got, expected):
        assert max_abs_err(g, e) < 1e-5


def test_compiled_graph_holds_the_op_whole():
    """torch.compile(fullgraph=True) over the op: no graph break inside it, same values and gradients."""
    hidden, weight, b, targets = make_inputs(31, 12, 45, torch.float32, bias=True)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]

    def f(h, w, bias):
        lp = torch.ops.rpo_fast.linear_logprobs_fwd(h, w, bias, targets, -100, "torch")[0]
        return (lp * torch.linspace(0.5, 1.5, lp.numel())).sum()

    eager = f(*leaves)
    expected = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    got = torch.autograd.grad(compiled, leaves)
    assert torch.allclose(compiled, eager, rtol=1e-6)
    for g, e in zip(got, expected):
        assert max_abs_err(g, e) < 1e-6
