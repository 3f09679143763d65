"""Every backward of `fused_linear_rpo_loss` against the float64 formulas of tests/rpo_reference_math.py,
directly: `err(backward) <= K * err(naive same-dtype computation) + floor`, where the naive computation
takes the logits in the input dtype and does everything else in float64. Plus the forward-time-gradient
path's cost: three head GEMMs per chunk for the policy and one for a reference head, none in backward, no
[N, V] tensor; and the trainer on its new default against the recompute path.
"""
import math
from typing import NamedTuple

import pytest
import torch

import rpo_fast
from conftest import HeadMatmulCounter, LargestTensorRecorder
from rpo_fast import chunked, fwdgrad
from rpo_fast.live_memory import OutputRecorder
from rpo_reference_math import logprobs64, random_pairs, rpo64

H, V, B = 19, 61, 3
K = 2.0
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-3}  # relative to the largest reference value


class Case(NamedTuple):
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    sft_norm: str = "token_mean"
    alpha: float = 0.7
    average_log_prob: bool = False
    bias: bool = True
    reference: str = "logps"  # "none" | "logps" | "head"
    chunk_tokens: int | None = None  # None: one chunk; small: several chunks and pairs longer than a chunk
    pair_weight: float = 1.0
    nll_weight: float = 1.0
    ignore_index: int = -100


CASES = {
    "sigmoid-smoothed-weighted": Case(label_smoothing=0.2, pair_weight=0.6, nll_weight=1.7),
    "hinge-sum-no-bias-head-ref": Case(loss_type="hinge", sft_norm="sum", bias=False, reference="head"),
    "ipo-seq_mean-reference-free": Case(loss_type="ipo", sft_norm="seq_mean", reference="none", alpha=1.5),
    "average_log_prob-several-chunks": Case(average_log_prob=True, chunk_tokens=24, nll_weight=0.4),
    "pairs-longer-than-the-chunk": Case(sft_norm="sum", alpha=2.5, chunk_tokens=7, reference="head"),
    "dpo-alpha-0": Case(alpha=0.0, chunk_tokens=16, pair_weight=2.0),
    "ignore_index-minus-7": Case(ignore_index=-7, sft_norm="seq_mean", chunk_tokens=20, reference="head"),
}


def make_problem(case: Case, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu = random_pairs(B, 14, min_len=3, generator=gen)  # N around 50: irregular, pairs of 6..28 rows
    n = int(cu[-1])
    hidden = torch.randn(n, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) * 0.4).to(dtype)
    bias = (torch.randn(V, generator=gen) * 0.5).to(dtype) if case.bias else None
    targets = torch.randint(0, V, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < 0.15] = case.ignore_index  # ignored tokens inside responses
    targets[cu[:-1].long()] = torch.randint(0, V, (2 * B,), generator=gen)  # every sequence keeps a token
    ref = {}
    if case.reference == "logps":
        ref = {"ref_logps": torch.randn(2 * B, generator=gen) * 5 - 40}
    elif case.reference == "head":
        ref = {"ref_hidden": torch.randn(n, H, generator=gen).to(dtype),
               "ref_weight": (torch.randn(V, H, generator=gen) * 0.4).to(dtype)}
    return hidden, weight, bias, targets, cu, ref


def loss_options(case: Case) -> dict:
    return dict(beta=0.3, alpha=case.alpha, sft_norm=case.sft_norm, loss_type=case.loss_type,
                label_smoothing=case.label_smoothing, average_log_prob=case.average_log_prob,
                ignore_index=case.ignore_index)


def float64_loss(case, hidden, weight, bias, targets, cu, ref, *, logits_dtype=None):
    """The loss (and its gradients) from rpo_reference_math in float64; with `logits_dtype`, the naive
    same-dtype computation: the head's product in that dtype, everything after it in float64."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    if logits_dtype is None:
        leaves = [t.detach().double().requires_grad_() for t in leaves]
        lp = logprobs64(leaves[0], leaves[1], leaves[2] if bias is not None else None, targets, case.ignore_index)
    else:
        logits = leaves[0] @ leaves[1].T
        if bias is not None:
            logits = logits + leaves[2]
        keep = targets != case.ignore_index
        lp = torch.log_softmax(logits.double(), -1).gather(1, torch.where(keep, targets, 0)[:, None])[:, 0]
        lp = torch.where(keep, lp, torch.zeros((), dtype=torch.float64))
    ref_seq = ref.get("ref_logps")
    if "ref_hidden" in ref:
        ref_lp = logprobs64(ref["ref_hidden"], ref["ref_weight"], None, targets, case.ignore_index)
        ref_seq = torch.stack([ref_lp[int(a):int(b)].sum() for a, b in zip(cu[:-1], cu[1:])])
    r = rpo64(lp, ref_seq, targets, cu, **loss_options(case))
    loss = case.pair_weight * r["pref_loss"] + case.nll_weight * case.alpha * r["nll"]
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), [g.double() for g in grads], r


def rel_err(got, expected, scale):
    return float((got.double() - expected.double()).abs().max()) / max(float(scale), 1e-30)


def check_against_float64(case, dtype, backward, impl="torch"):
    hidden, weight, bias, targets, cu, ref = make_problem(case, dtype)
    exact_loss, exact_grads, exact = float64_loss(case, hidden, weight, bias, targets, cu, ref)
    naive_loss, naive_grads, _ = float64_loss(case, hidden, weight, bias, targets, cu, ref, logits_dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    out = rpo_fast.fused_linear_rpo_loss(
        leaves[0], leaves[1], targets, cu, bias=leaves[2] if bias is not None else None, **ref, **loss_options(case),
        impl=impl, backward=backward, chunk_tokens=case.chunk_tokens, pair_weight=case.pair_weight,
        nll_weight=case.nll_weight)
    out.loss.backward()
    scale = abs(float(exact_loss)) + 1.0
    bound = K * rel_err(naive_loss, exact_loss, scale) + FLOOR[dtype]
    assert rel_err(out.loss, exact_loss, scale) <= bound, ("loss", float(out.loss), float(exact_loss), bound)
    for name, leaf, e, n in zip(("hidden", "weight", "bias"), leaves, exact_grads, naive_grads):
        scale = float(e.abs().max())
        bound = K * rel_err(n, e, scale) + FLOOR[dtype]
        assert leaf.grad is not None and leaf.grad.dtype == dtype, name
        assert rel_err(leaf.grad, e, scale) <= bound, (name, rel_err(leaf.grad, e, scale), bound)
    for field in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "pref_loss", "nll"):
        scale = float(exact[field].abs().max()) + 1.0
        assert rel_err(getattr(out, field).detach(), exact[field], scale) <= 1e-5 + (3e-3 if dtype != torch.float32
                                                                                      else 0), field


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backward", ["fwdgrad", "recompute"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_backward_against_float64(case, dtype, backward):
    check_against_float64(CASES[case], dtype, backward)


@pytest.mark.parametrize("case,dtype", [("sigmoid-smoothed-weighted", torch.float32),
                                        ("pairs-longer-than-the-chunk", torch.bfloat16),
                                        ("ignore_index-minus-7", torch.float32)],
                         ids=["fp32", "bf16", "ignore_index-minus-7-fp32"])
def test_atomic_backward_against_float64(case, dtype):
    """The Triton kernel backward (interpreted on CPU: slow, so three cases; one with ignore_index=-7)."""
    check_against_float64(CASES[case], dtype, "atomic", impl="triton")


def test_fwdgrad_only_loss_is_differentiable_and_backward_scales():
    case = CASES["sigmoid-smoothed-weighted"]
    hidden, weight, bias, targets, cu, ref = make_problem(case, torch.float32)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    out = rpo_fast.fused_linear_rpo_loss(*leaves[:2], targets, cu, bias=leaves[2], **ref, backward="fwdgrad")
    assert out.loss.requires_grad
    assert not any(t.requires_grad for name, t in out._asdict().items() if name != "loss")
    (3.5 * out.loss).backward()
    scaled = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    rpo_fast.fused_linear_rpo_loss(*leaves[:2], targets, cu, bias=leaves[2], **ref, backward="fwdgrad").loss.backward()
    for s, t in zip(scaled, leaves):
        torch.testing.assert_close(s, 3.5 * t.grad)


def test_fwdgrad_backward_scales_half_gradients_in_fp32():
    """A bf16 loss scaled by 1/3 (gradient accumulation's 1/GA): the stored bf16 gradients are scaled by 1/3,
    not by bf16(1/3) = 0.333984, which would put every gradient 0.18% high."""
    hidden, weight, bias, targets, cu, ref = make_problem(Case(bias=False), torch.bfloat16)

    def grads(scale):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
        out = rpo_fast.fused_linear_rpo_loss(*leaves, targets, cu, **ref, backward="fwdgrad")
        (out.loss * scale).backward()
        return [t.grad for t in leaves]

    for unit, third in zip(grads(1.0), grads(1 / 3)):
        exact = (unit.double() / 3).to(torch.bfloat16)  # the unit gradient / 3, rounded once
        assert float((third != exact).float().mean()) < 0.01


def test_fwdgrad_refuses_a_second_derivative():
    """create_graph=True: the first-order gradients are right, and differentiating them (a gradient penalty)
    raises; before, the stored gradients were constants to autograd and the penalty's gradient was silently 0
    (float64: nonzero). impl="dense" differentiates twice."""
    case = Case(bias=False, reference="none")
    hidden, weight, _, targets, cu, _ = make_problem(case, torch.float32)
    _, exact_grads, _ = float64_loss(case, hidden, weight, None, targets, cu, {})
    hidden.requires_grad_(), weight.requires_grad_()
    out = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, **loss_options(case), backward="fwdgrad")
    grad_hidden, grad_weight = torch.autograd.grad(out.loss, (hidden, weight), create_graph=True)
    torch.testing.assert_close(grad_hidden.double(), exact_grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_weight.double(), exact_grads[1], rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError, match="no second derivative"):
        grad_hidden.pow(2).sum().backward()

    dense = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, **loss_options(case), impl="dense")
    grad_hidden, = torch.autograd.grad(dense.loss, hidden, create_graph=True)
    grad_hidden.pow(2).sum().backward()
    assert weight.grad.abs().max() > 0


def test_fwdgrad_pairs_without_response_tokens_before_a_long_pair():
    """Pairs whose responses are empty (cu_seqlens spans of 0 rows) next to a pair longer than the chunk: they
    plan as a chunk of no rows, which has log-probs 0 and no gradient (it used to crash in the first pass)."""
    gen = torch.Generator().manual_seed(11)
    cu = torch.tensor([0, 0, 10, 10, 20], dtype=torch.int32)  # pair 0: two empty responses; pair 1: 10 + 10 rows
    hidden = torch.randn(20, H, generator=gen, requires_grad=True)
    weight = (torch.randn(V, H, generator=gen) * 0.4).requires_grad_()
    targets = torch.randint(0, V, (20,), generator=gen)
    ref = torch.randn(4, generator=gen) - 30
    case = Case(bias=False, sft_norm="sum")
    exact_loss, exact_grads, _ = float64_loss(case, hidden, weight, None, targets, cu, {"ref_logps": ref})
    for chunk_tokens in (8, 32):
        out = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, ref_logps=ref, **loss_options(case),
                                             backward="fwdgrad", chunk_tokens=chunk_tokens)
        hidden.grad = weight.grad = None
        out.loss.backward()
        assert out.chosen_logps[0] == 0 and out.rejected_logps[0] == 0
        torch.testing.assert_close(out.loss.double(), exact_loss, rtol=1e-5, atol=1e-5)
        for leaf, e in zip((hidden, weight), exact_grads):
            torch.testing.assert_close(leaf.grad.double(), e, rtol=1e-4, atol=1e-5)


def test_fwdgrad_frozen_head_gives_hidden_gradient_only():
    """LoRA: the head is frozen; only dhidden is formed (no [V, H] accumulator is allocated)."""
    hidden, weight, bias, targets, cu, ref = make_problem(Case(bias=False, chunk_tokens=20), torch.float32)
    hidden.requires_grad_()
    with NewTensorRecorder() as rec:
        rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, **ref, backward="fwdgrad",
                                       chunk_tokens=20).loss.backward()
    assert hidden.grad is not None and weight.grad is None
    assert (V, H) not in rec.shapes and rec.shapes, rec.shapes


class NewTensorRecorder(OutputRecorder):
    """Shapes of the tensors that operators create (views and in-place results are not new tensors)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def record(self, func, out) -> None:
        if func.is_view or func._schema.is_mutable:
            return
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))


def test_auto_picks_by_whether_a_gradient_is_needed(monkeypatch):
    calls = []
    real = fwdgrad.fwdgrad_head_loss
    monkeypatch.setattr(rpo_fast.loss, "fwdgrad_head_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, bias, targets, cu, ref = make_problem(CASES["sigmoid-smoothed-weighted"], torch.float32)
    out = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, **ref)  # nothing requires grad
    assert calls == [] and not out.loss.requires_grad
    with torch.no_grad():
        rpo_fast.fused_linear_rpo_loss(hidden.requires_grad_(), weight, targets, cu, **ref)
    assert calls == []
    rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, **ref).loss.backward()
    assert calls == [1]


@pytest.mark.parametrize("backward", ["auto", "recompute"])
def test_fp16_gradients_under_loss_scaling(backward):
    """fp16 under a GradScaler (the loss times 2**16): no gradient entry whose scaled float64 value is a normal
    fp16 number comes out 0. fwdgrad rounds its gradients to fp16 in forward, at the loss's scale of 1, where
    such entries underflow (10.6% of dW's here) before the scale reaches them: "auto" does not pick it for fp16."""
    gen = torch.Generator().manual_seed(0)
    n, h, v, scale = 960, 64, 2000, 2.0**16
    cu = torch.arange(0, n + 1, 60, dtype=torch.int32)  # 8 pairs of 60-token responses
    targets = torch.randint(0, v, (n,), generator=gen)
    leaves = [torch.randn(n, h, generator=gen).half().requires_grad_(),
              (torch.randn(v, h, generator=gen) * 3).half().requires_grad_()]
    case = Case(bias=False, reference="none")
    out = rpo_fast.fused_linear_rpo_loss(*leaves, targets, cu, **loss_options(case), backward=backward)
    (out.loss * scale).backward()
    _, exact_grads, _ = float64_loss(case, *leaves, None, targets, cu, {})
    for name, leaf, exact in zip(("hidden", "weight"), leaves, exact_grads):
        exact = exact * scale
        assert float(exact.abs().max()) < torch.finfo(torch.float16).max  # no overflow: GradScaler keeps the step
        normal = exact.abs() >= torch.finfo(torch.float16).tiny
        zeroed = leaf.grad[normal] == 0
        assert not zeroed.any(), (name, f"{float(zeroed.double().mean()):.1%} of the normal entries are 0")


@pytest.mark.parametrize("kwargs,name", [(dict(backward="fast"), "backward"), (dict(chunk_tokens=0), "chunk_tokens"),
                                         (dict(chunk_tokens=2.5), "chunk_tokens"), (dict(pair_weight=-1.0), "pair_weight"),
                                         (dict(nll_weight=float("nan")), "nll_weight"),
                                         (dict(impl="dense", backward="fwdgrad"), "backward")])
def test_bad_keywords_name_the_argument(kwargs, name):
    hidden, weight, bias, targets, cu, ref = make_problem(Case(), torch.float32)
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, **ref, **kwargs)


def test_linear_logprobs_backward_keyword():
    hidden, weight, bias, targets, cu, _ = make_problem(Case(), torch.float32)
    with pytest.raises(ValueError, match="^backward: expected"):
        rpo_fast.linear_logprobs(hidden, weight, targets, backward="fwdgrad")
    grads = {}
    for backward in ("auto", "recompute", "atomic"):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        lp = rpo_fast.linear_logprobs(leaves[0], leaves[1], targets, leaves[2], impl="torch", backward=backward)
        (lp * torch.linspace(-1, 2, lp.numel())).sum().backward()
        grads[backward] = [t.grad for t in leaves]
    for backward in ("recompute", "atomic"):
        for got, expected in zip(grads[backward], grads["auto"]):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # fp32 sums in another order


# --- the forward-time-gradient path's cost ---


@pytest.mark.parametrize("backward", ["fwdgrad", "recompute"])
def test_head_matmuls_per_chunk(backward, monkeypatch):
    """fwdgrad: per chunk of pairs, one logits product [C, V], one dhidden [C, H], one dweight [V, H], all in
    forward, none in backward; plus the forward-only products of the reference head. The recompute path is
    the control: it computes the logits again in backward."""
    rows = 30
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", rows * V)  # the reference head and recompute path
    hidden, weight, bias, targets, cu, ref = make_problem(Case(reference="head"), torch.float32)
    n = hidden.shape[0]
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    chunks = fwdgrad.plan_chunks(cu.tolist(), rows)
    assert len(chunks) >= 2 and all(c.rows <= rows for c in chunks)
    row_chunks = [(min(rows, n - a), V) for a in range(0, n, rows)]  # the op's chunks of rows
    with HeadMatmulCounter(V) as forward:
        out = rpo_fast.fused_linear_rpo_loss(*leaves[:2], targets, cu, bias=leaves[2], **ref, backward=backward,
                                             chunk_tokens=rows)
    with HeadMatmulCounter(V) as backward_pass:
        out.loss.backward()
    if backward == "fwdgrad":
        policy = [(c.rows, V) for c in chunks] + [(c.rows, H) for c in chunks] + [(V, H)] * len(chunks)
        assert sorted(forward.products) == sorted(policy + row_chunks)  # 3 per chunk + the reference's logits
        assert backward_pass.products == []
    else:
        assert sorted(forward.products) == sorted(row_chunks * 2)  # policy and reference logits
        assert sorted(p for p in backward_pass.products if p[1] == V) == sorted(row_chunks)  # recomputed
    assert forward.largest[0] < n * V and backward_pass.largest[0] < n * V


def test_fwdgrad_never_allocates_n_by_v():
    """At a shape where one chunk is a small part of N: nothing [N, V]-sized, forward or backward."""
    gen = torch.Generator().manual_seed(3)
    n_pairs, length = 6, 20
    cu = torch.arange(0, 2 * n_pairs * length + 1, length, dtype=torch.int32)
    n = int(cu[-1])
    hidden = torch.randn(n, H, generator=gen, requires_grad=True)
    weight = torch.randn(V, H, generator=gen, requires_grad=True)
    targets = torch.randint(0, V, (n,), generator=gen)
    with LargestTensorRecorder(dim_size=V) as rec:
        rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, backward="fwdgrad",
                                       chunk_tokens=2 * length).loss.backward()
    assert rec.largest[0] <= max(V * H, 2 * length * V), rec.largest


def test_plan_chunks_holds_whole_pairs():
    bounds = [0, 3, 10, 12, 14, 20, 21, 30, 31]  # 4 pairs: rows 3+6=9, 7+1=8, 2+9=11, 2+1=3
    chunks = fwdgrad.plan_chunks(bounds, 10)
    assert [(c.first, c.last) for c in chunks] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert chunks[0].chosen == slice(0, 3) and chunks[0].rejected == slice(14, 20)
    assert [(c.first, c.last) for c in fwdgrad.plan_chunks(bounds, 17)] == [(0, 2), (2, 4)]
    assert [(c.first, c.last) for c in fwdgrad.plan_chunks(bounds, 5)] == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_row_pieces_keep_a_full_last_piece():
    assert fwdgrad.row_pieces(9, 10) == [slice(0, 9)]
    assert fwdgrad.row_pieces(20, 10) == [slice(0, 10), slice(10, 20)]
    assert fwdgrad.row_pieces(23, 10) == [slice(0, 3), slice(3, 13), slice(13, 23)]


def test_a_pair_longer_than_the_chunk_recomputes_only_what_does_not_fit():
    """One pair of 2 x 13 rows in chunks of 10: the first pass makes the logits of pieces of 6, 10 and 10 rows;
    the gradient pass keeps the last 10 and computes the other 16 rows again (not 20, as pieces of 10, 10, 6
    keeping the short one would), and each piece's dhidden and dW products are made once."""
    gen = torch.Generator().manual_seed(5)
    cu = torch.tensor([0, 13, 26], dtype=torch.int32)
    hidden = torch.randn(26, H, generator=gen, requires_grad=True)
    weight = torch.randn(V, H, generator=gen, requires_grad=True)
    targets = torch.randint(0, V, (26,), generator=gen)
    with HeadMatmulCounter(V) as rec:
        rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, ref_logps=torch.full((2,), -40.0),
                                       backward="fwdgrad", chunk_tokens=10)
    logits = [p for p in rec.products if p[1] == V]
    assert sorted(logits) == sorted([(6, V), (10, V), (10, V), (6, V), (10, V)])
    assert sorted(p for p in rec.products if p[1] == H and p[0] != V) == [(6, H), (10, H), (10, H)]
    assert [p for p in rec.products if p == (V, H)] == [(V, H)] * 3


# --- the trainer ---


def test_trainer_default_equals_recompute(tmp_path):
    from rpo_fast.config import load_config
    from rpo_fast.metrics import PAIR_METRICS
    from rpo_fast.trainer import train
    from tiny_lm import build_tiny_model_dir, tiny_overrides

    model_dir = build_tiny_model_dir(tmp_path / "model")
    runs = {}
    for name in ("auto", "recompute"):
        (tmp_path / name).mkdir()
        config = load_config(None, tiny_overrides(model_dir, tmp_path / name, max_steps=3, head_backward=name,
                                                  gradient_accumulation_steps=2, max_pairs_per_micro_batch=2,
                                                  sft_norm="token_mean", alpha=1.5))
        runs[name] = train(config)
    records = {name: [r for r in run.records if "loss" in r] for name, run in runs.items()}
    assert len(records["auto"]) == 3
    for a, b in zip(records["auto"], records["recompute"]):
        for key in (*PAIR_METRICS, "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-5), (a["step"], key, a[key], b[key])
    expected, got = runs["recompute"].model.state_dict(), runs["auto"].model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("case", ["pairs-longer-than-the-chunk", "ignore_index-minus-7"])
def test_fwdgrad_with_the_triton_row_kernels_equals_the_torch_passes(case):
    """The CUDA path's per-row passes (kernels/logit_grad.py, interpreted here) give what the torch passes
    give, several chunks and a pair longer than the chunk included, and with ignore_index=-7."""
    pytest.importorskip("triton")
    case = CASES[case]
    hidden, weight, bias, targets, cu, _ = make_problem(case, torch.float32)
    results = []
    for use_kernels in (False, True):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss, _ = fwdgrad.fwdgrad_head_loss(*leaves, targets, cu.tolist(), lambda s: ((s * s.sin()).sum(), None),
                                            ignore_index=case.ignore_index, chunk_tokens=case.chunk_tokens,
                                            use_kernels=use_kernels)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for got, expected in zip(*reversed(results)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # fp32 sums in another order
