"""linear_logprobs: the Triton (interpreter), chunked torch and dense paths against float64, forward and
backward, across dtypes, irregular shapes, bias and ignored tokens. A path passes when its error is at
most twice the same-dtype dense PyTorch error plus a small dtype tolerance."""
import importlib

import pytest
import torch

import rpo_fast
from rpo_fast.chunked import chunked_linear_logprobs_bwd, chunked_linear_logprobs_fwd
from rpo_fast.kernels import TileConfig, linear_logprobs_bwd, linear_logprobs_fwd
from conftest import max_abs_err
from rpo_reference_math import logprobs64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Extra absolute slack per dtype, relative to the reference's largest magnitude.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
# (N, H, V): irregular (nothing divides a block), a single token and a one-entry tail tile, block-aligned.
SHAPES = [(70, 75, 301), (1, 8, 5), (64, 64, 256), (5, 3, 129)]


def make_inputs(N, H, V, dtype, bias, ignore_frac=0.2, scale=1.0):
    hidden = (torch.randn(N, H) * scale).to(dtype)
    weight = (torch.randn(V, H) / H**0.5).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,))
    targets[torch.rand(N) < ignore_frac] = -100
    return hidden, weight, b, targets


def judge(name, err, dense_err, dtype, magnitude):
    bound = 2 * dense_err + TOL[dtype] * max(1.0, magnitude)
    assert err <= bound, f"{name}: error {err:.3g} > 2 x dense {dense_err:.3g} + tol (bound {bound:.3g})"


def grads_of(fn, hidden, weight, bias, targets, g):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    lp = fn(*leaves, targets)
    (lp.double() * g).sum().backward()
    return lp.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_grads_match_float64(impl, dtype, bias, shape):
    hidden, weight, b, targets = make_inputs(*shape, dtype, bias)
    g = torch.randn(shape[0], dtype=torch.float64)
    ref_lp, ref_grads = grads_of(lambda h, w, bb, t: logprobs64(h, w, bb, t), hidden, weight, b, targets, g)
    dense_lp, dense_grads = grads_of(lambda h, w, bb, t: rpo_fast.linear_logprobs(h, w, t, bb, impl="dense"),
                                     hidden, weight, b, targets, g)
    lp, grads = grads_of(lambda h, w, bb, t: rpo_fast.linear_logprobs(h, w, t, bb, impl=impl),
                         hidden, weight, b, targets, g)

    assert lp.dtype == torch.float32 and lp.shape == (shape[0],)
    assert torch.all(lp[targets == -100] == 0)
    judge("logprobs", max_abs_err(lp, ref_lp), max_abs_err(dense_lp, ref_lp), dtype, ref_lp.abs().max().item())
    for name, got, dense, ref in zip(("d_hidden", "d_weight", "d_bias"), grads, dense_grads, ref_grads):
        if ref is None:
            continue
        assert got.dtype == dtype and got.shape == ref.shape, name
        judge(name, max_abs_err(got, ref), max_abs_err(dense, ref), dtype, ref.abs().max().item())


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
    dh, dw, db = linear_logprobs_bwd(hidden, weight, b, targets, lse, g, config=cfg)
    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, b))
    (logprobs64(h64, w64, b64, targets) * g.double()).sum().backward()
    for got, ref_grad in ((dh, h64.grad), (dw, w64.grad), (db, b64.grad)):
        assert max_abs_err(got, ref_grad) <= TOL[dtype] * max(1.0, ref_grad.abs().max().item()) + 1e-5


def test_chunked_path_matches_across_chunk_sizes():
    hidden, weight, b, targets = make_inputs(50, 20, 97, torch.float32, bias=True)
    lp_all, lse_all = chunked_linear_logprobs_fwd(hidden, weight, b, targets, chunk_size=50)
    g = torch.randn(50)
    grads_all = chunked_linear_logprobs_bwd(hidden, weight, b, targets, lse_all, g, chunk_size=50)
    for chunk in (1, 7, 49):
        lp, lse = chunked_linear_logprobs_fwd(hidden, weight, b, targets, chunk_size=chunk)
        torch.testing.assert_close(lp, lp_all)
        grads = chunked_linear_logprobs_bwd(hidden, weight, b, targets, lse, g, chunk_size=chunk)
        for got, want in zip(grads, grads_all):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_only_requested_grads_and_non_contiguous_inputs(impl):
    hidden, weight, _, targets = make_inputs(20, 30, 50, torch.float32, bias=False)
    hidden_t = hidden.T.contiguous().T  # column-major: a non-unit last stride
    weight_leaf = weight.clone().requires_grad_()
    lp = rpo_fast.linear_logprobs(hidden_t, weight_leaf, targets, impl=impl)
    lp.sum().backward()
    w64 = weight.double().requires_grad_()
    logprobs64(hidden, w64, None, targets).sum().backward()
    assert max_abs_err(weight_leaf.grad, w64.grad) < 1e-5
    assert not hidden_t.requires_grad


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
    peaked logits make many tiles skippable. Results stay within the same-dtype dense error bound."""
    monkeypatch.delenv("RPO_FAST_GRAD_FILTER", raising=False)
    hidden, weight, _, targets = make_inputs(40, 64, 2000, dtype, bias=False, scale=12.0)
    g = torch.randn(40, dtype=torch.float64)
    ref_lp, ref_grads = grads_of(lambda h, w, bb, t: logprobs64(h, w, bb, t), hidden, weight, None, targets, g)
    _, dense_grads = grads_of(lambda h, w, bb, t: rpo_fast.linear_logprobs(h, w, t, impl="dense"),
                              hidden, weight, None, targets, g)
    cfg = TileConfig(block_n=16, block_v=64, block_h=64)
    lp, lse = linear_logprobs_fwd(hidden, weight, None, targets, config=cfg)
    exact = linear_logprobs_bwd(hidden, weight, None, targets, lse, g, needs_grad=(True, True, False), config=cfg)
    monkeypatch.setenv("RPO_FAST_GRAD_FILTER", "auto")
    filtered = linear_logprobs_bwd(hidden, weight, None, targets, lse, g, needs_grad=(True, True, False), config=cfg)
    assert any(not torch.equal(a, b) for a, b in zip(exact[:2], filtered[:2])), "the filter skipped no tile"
    for name, got, dense, ref in zip(("d_hidden", "d_weight"), filtered, dense_grads, ref_grads):
        judge(name, max_abs_err(got, ref), max_abs_err(dense, ref), dtype, ref.abs().max().item())
    monkeypatch.setenv("RPO_FAST_GRAD_FILTER", "often")
    with pytest.raises(ValueError, match="RPO_FAST_GRAD_FILTER"):
        linear_logprobs_bwd(hidden, weight, None, targets, lse, g, config=cfg)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("bias", [False, True])
def test_custom_op_registration(impl, bias):
    """Schema, fake (meta) outputs, autograd registration and AOT dispatch of the custom op agree with its real
    outputs (torch.library.opcheck), so torch.compile can treat the fused head as one op."""
    from rpo_fast.logprobs import linear_logprobs_fwd as op

    hidden, weight, b, targets = make_inputs(23, 10, 37, torch.float32, bias=bias)
    hidden.requires_grad_()
    weight.requires_grad_()
    if b is not None:
        b.requires_grad_()
    results = torch.library.opcheck(op, (hidden, weight, b, targets, -100, impl))
    assert set(results.values()) == {"SUCCESS"}, results


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
