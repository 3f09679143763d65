"""Numerical edges: huge and tiny logits, a vocabulary of one, a rejected response with every token
ignored, a zero-length sequence (with gradients, and refused where a normalization divides by it), plain DPO without
a chosen token, extreme beta, label smoothing 0.5, an ignored position with overflowing logits. Outputs are finite
and equal the float64 reference."""
import math

import pytest
import torch

import rpo_fast
from conftest import assert_close
from rpo_reference_math import assert_within, logprobs64, naive_logprobs, rpo64
from test_rpo_loss import triton_row_passes

IMPLS = ["triton", "torch", "dense"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,logit_scale", [
    (torch.float32, 1e4),     # |logit| ~ 1e4: a naive exp overflows
    (torch.bfloat16, 1e4),    # bf16 inputs; torch/dense round the logits to bf16 (8 bits), as the naive computation
    (torch.float32, 1e-6),    # near-uniform softmax
])
def test_extreme_logit_magnitudes(impl, dtype, logit_scale):
    N, H, V = 23, 16, 150
    hidden = torch.randn(N, H).to(dtype)
    weight = (torch.randn(V, H) * logit_scale / H**0.5).to(dtype)
    targets = torch.randint(0, V, (N,))
    lp = rpo_fast.linear_logprobs(hidden, weight, targets, impl=impl)
    assert torch.isfinite(lp).all()
    # Log-probs of order logit_scale: the floor is relative to the largest of them.
    assert_within(f"logprobs at scale {logit_scale}", lp, logprobs64(hidden, weight, None, targets),
                  naive_logprobs(hidden, weight, None, targets), dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_vocabulary_of_one(impl):
    hidden = torch.randn(6, 5, requires_grad=True)
    weight = torch.randn(1, 5, requires_grad=True)
    targets = torch.zeros(6, dtype=torch.int64)
    cu = torch.tensor([0, 2, 3, 5, 6], dtype=torch.int32)
    out = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, impl=impl)
    assert torch.all(out.chosen_logps == 0) and torch.all(out.rejected_logps == 0)
    assert_close(out.loss, torch.log(torch.tensor(2.0)), atol=1e-6, name="loss with z=0")
    out.loss.backward()
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


@pytest.mark.parametrize("impl,backward", [("triton", "recompute"), ("triton", "atomic"), ("torch", "recompute"),
                                            ("dense", "auto")])
def test_no_rows(impl, backward):
    """N = 0 tokens: empty log-probs and all-zero gradients (the Triton forward's launcher divided by its 0 token
    blocks when choosing how many vocabulary splits to run)."""
    hidden = torch.randn(0, 5, requires_grad=True)
    weight = torch.randn(9, 5, requires_grad=True)
    bias = torch.randn(9, requires_grad=True)
    lp = rpo_fast.linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.int64), bias, impl=impl,
                                  backward=backward)
    assert lp.shape == (0,) and lp.dtype == torch.float32
    lp.sum().backward()
    for leaf in (hidden, weight, bias):
        assert leaf.grad.shape == leaf.shape and torch.all(leaf.grad == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_rejected_response_with_all_tokens_ignored(impl):
    N, H, V = 12, 7, 40
    hidden, weight = torch.randn(N, H), torch.randn(V, H)
    targets = torch.randint(0, V, (N,))
    targets[9:12] = -100  # sequence 3 (the second rejected one) is entirely ignored
    cu = torch.tensor([0, 3, 6, 9, 12], dtype=torch.int32)
    out = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, impl=impl)
    exp = rpo64(logprobs64(hidden, weight, None, targets), None, targets, cu, beta=0.1, alpha=1.0,
                sft_norm="token_mean", loss_type="sigmoid", label_smoothing=0.0, average_log_prob=False)
    assert torch.isfinite(out.loss) and out.rejected_logps[1] == 0
    assert_close(out.loss, exp["loss"], atol=1e-5, name="loss")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("alpha", [0.5, 0.0], ids=["rpo", "dpo"])
@pytest.mark.parametrize("beta,label_smoothing,loss_type", [
    (1e3, 0.0, "sigmoid"), (1e-6, 0.0, "sigmoid"), (0.1, 0.5, "sigmoid"), (1e3, 0.0, "hinge"), (1e-3, 0.0, "ipo"),
])
def test_extreme_beta_and_label_smoothing(impl, beta, label_smoothing, loss_type, alpha):
    """Loss, rewards, preference term and d_hidden at extreme beta against float64. The preference term is judged
    apart from the NLL (its distance from its value at z=0, and with alpha=0 its gradient relative to its own size):
    at beta=1e-6 it is log 2 + O(1e-6), so a beta^2 or a chosen/rejected swap in it hides in the loss."""
    N, H, V = 16, 9, 33
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H)
    targets = torch.randint(0, V, (N,))
    cu = torch.tensor([0, 4, 8, 12, 16], dtype=torch.int32)
    opts = dict(beta=beta, alpha=alpha, sft_norm="sum", loss_type=loss_type, label_smoothing=label_smoothing,
                average_log_prob=False)
    out = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, impl=impl, **opts)
    out.loss.backward()
    h64 = hidden.detach().double().requires_grad_()
    exp = rpo64(logprobs64(h64, weight, None, targets), None, targets, cu, **opts)
    exp["loss"].backward()
    assert torch.isfinite(out.loss) and torch.isfinite(hidden.grad).all()
    assert_close(out.loss, exp["loss"], atol=1e-5, rtol=1e-5, name="loss")
    for f in ("chosen_rewards", "rejected_rewards"):  # beta * log-probs of -2..-4 per token: never near 0
        assert_close(getattr(out, f), exp[f], atol=0.0, rtol=1e-4, name=f)
    # The preference term less its value at z = 0: at beta=1e-6, -1.9e-6 here (float32 rounds pref_loss ~0.69 to
    # 6e-8), +1.9e-6 with chosen and rejected swapped, ~0 with beta^2.
    at_zero = {"sigmoid": math.log(2.0), "hinge": 1.0, "ipo": 1 / (4 * beta**2)}[loss_type]
    assert_close(out.pref_loss.double() - at_zero, exp["pref_loss"] - at_zero, atol=3e-7, rtol=1e-2,
                 name="pref_loss - l(0)")
    # Relative to the gradient's own size (with alpha=0 it is the preference term's alone: ~1e-6 at beta=1e-6).
    assert_close(hidden.grad, h64.grad, atol=1e-5 * h64.grad.abs().max().item(), rtol=1e-4, name="d_hidden")


# Pair 0's rejected sequence has no rows (cu_seqlens repeats 9); pair 2's rejected rows are all ignored.
EMPTY_CU = torch.tensor([0, 3, 6, 9, 9, 12, 15], dtype=torch.int32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("backward", ["fwdgrad", "recompute"])
@pytest.mark.parametrize("options", [
    dict(sft_norm="seq_mean", loss_type="sigmoid", label_smoothing=0.2),
    dict(sft_norm="token_mean", loss_type="hinge", label_smoothing=0.0),
], ids=["seq_mean-sigmoid", "token_mean-hinge"])
def test_gradients_with_a_zero_length_and_an_all_ignored_rejected_sequence(impl, backward, options):
    """Loss, metrics and gradients (hidden, weight, bias) against float64 when a rejected sequence has no rows and
    another has every target ignored: both score 0 with 0 tokens, in fwdgrad's chunks (several, a pair split into
    pieces) and in the recompute backward."""
    N, H, V = 15, 6, 29
    hidden, weight, bias = torch.randn(N, H), torch.randn(V, H) / H**0.5, torch.randn(V)
    targets = torch.randint(0, V, (N,))
    targets[12:15] = -100
    targets[4] = -100  # a gap inside chosen sequence 1: seq_mean and token_mean differ
    ref_logps = -torch.rand(6) * 10
    opts = dict(beta=0.3, alpha=0.7, average_log_prob=False) | options
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    # chunks of 4 rows: pair 0 (3 rows) alone, pairs 1 and 2 (6 rows) each split into pieces
    with triton_row_passes(impl == "triton" and backward == "fwdgrad"):  # the row kernels a GPU runs (interpreted)
        out = rpo_fast.fused_linear_rpo_loss(*leaves[:2], targets, EMPTY_CU, bias=leaves[2], ref_logps=ref_logps,
                                             impl=impl, backward=backward,
                                             chunk_tokens=4 if backward == "fwdgrad" else None, **opts)
        out.loss.backward()
    grads = [t.grad for t in leaves]

    def reference(logprobs, leaves):
        exp = rpo64(logprobs(*leaves, targets), ref_logps.double(), targets, EMPTY_CU, **opts)
        exp["loss"].backward()
        return exp, [t.grad for t in leaves]

    exp, exp_grads = reference(logprobs64, [t.double().requires_grad_() for t in (hidden, weight, bias)])
    naive, naive_grads = reference(naive_logprobs, [t.clone().requires_grad_() for t in (hidden, weight, bias)])
    assert out.rejected_logps[0] == 0 and out.rejected_logps[2] == 0
    for f in ("loss", "pref_loss", "nll", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards",
              "chosen_token_counts", "rejected_token_counts"):
        assert_within(f, getattr(out, f), exp[f], naive[f], torch.float32)
    for name, g, e, n in zip(("d_hidden", "d_weight", "d_bias"), grads, exp_grads, naive_grads):
        assert g is not None and torch.isfinite(g).all(), name
        assert_within(name, g, e, n, torch.float32, min_scale=1e-3, rowwise=True)


@pytest.mark.parametrize("backward", ["fwdgrad", "recompute"])
@pytest.mark.parametrize("cu,options,message", [
    ([0, 3, 6, 9, 9, 12, 15], dict(average_log_prob=True), r"sequence 3 \(rejected\) has no response tokens"),
    ([0, 3, 3, 9, 9, 12, 15], dict(sft_norm="seq_mean"), r"chosen sequence 1 has no response tokens.*seq_mean"),
    ([0, 0, 0, 0, 5, 10, 15], dict(sft_norm="token_mean"), r"no chosen sequence has response tokens.*token_mean"),
], ids=["average_log_prob", "seq_mean", "token_mean"])
def test_zero_length_sequence_a_normalization_divides_by_is_refused_with_gradients(backward, cu, options, message):
    """A zero-length sequence that a normalization would divide by raises ValueError naming it, also when a
    gradient is wanted (fwdgrad checks the counts on its own path)."""
    hidden, weight = torch.randn(15, 6, requires_grad=True), torch.randn(29, 6, requires_grad=True)
    targets = torch.randint(0, 29, (15,))
    with pytest.raises(ValueError, match=rf"^targets \(counted per cu_seqlens span.*{message}"):
        rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, torch.tensor(cu, dtype=torch.int32),
                                       backward=backward, **options)


@pytest.mark.parametrize("path", ["fwdgrad", "recompute", "rpo_loss"])
def test_plain_dpo_without_chosen_tokens_reports_an_nll_of_0(path):
    """alpha=0 (plain DPO), token_mean, no chosen token counted (one chosen sequence of length 0, the others every
    target ignored): the NLL is only a metric there and is 0, not 0/0 = NaN; the loss is the preference term,
    the rewards and the gradient as float64's (the NLL takes no part)."""
    N, H, V = 15, 6, 29
    hidden, weight = torch.randn(N, H), torch.randn(V, H) / H**0.5
    targets = torch.randint(0, V, (N,))
    targets[:5] = -100
    cu = torch.tensor([0, 2, 2, 5, 8, 13, 15], dtype=torch.int32)  # chosen 0-2, rejected 3-5
    ref_logps = -torch.rand(6) * 10
    opts = dict(beta=0.3, alpha=0.0, sft_norm="token_mean", loss_type="sigmoid", label_smoothing=0.0,
                average_log_prob=False)
    leaf = hidden.clone().requires_grad_()
    if path == "rpo_loss":  # from per-sequence log-probs
        lp = torch.log_softmax(leaf @ weight.T, -1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
        seq_logps = torch.stack([lp[a:b][targets[a:b] != -100].sum() for a, b in zip(cu[:-1], cu[1:])])
        counts = torch.tensor([int((targets[a:b] != -100).sum()) for a, b in zip(cu[:-1], cu[1:])])
        out = rpo_fast.rpo_loss(seq_logps, ref_logps, counts, **opts)
    else:
        out = rpo_fast.fused_linear_rpo_loss(leaf, weight, targets, cu, ref_logps=ref_logps, backward=path, **opts)
    out.loss.backward()
    h64 = hidden.double().requires_grad_()
    exp = rpo64(logprobs64(h64, weight.double(), None, targets), ref_logps.double(), targets, cu, **opts)
    exp["pref_loss"].backward()  # rpo64's own nll here is 0/0
    assert out.nll == 0 and out.chosen_token_counts.tolist() == [0, 0, 0]
    for name in ("loss", "pref_loss"):
        assert_close(getattr(out, name), exp["pref_loss"], atol=1e-6, rtol=1e-5, name=name)
    for name in ("rejected_logps", "chosen_rewards", "rejected_rewards"):
        assert_close(getattr(out, name), exp[name], atol=1e-5, rtol=1e-5, name=name)
    assert_close(leaf.grad, h64.grad, atol=1e-6, rtol=1e-4, name="d_hidden")


@pytest.mark.parametrize("backward, layout", [("recompute", "tokens"), ("recompute", "vocab"), ("atomic", None)])
def test_an_ignored_position_with_overflowing_logits_gets_no_gradient(backward, layout, monkeypatch):
    """A position whose logits overflow to +inf (its log-softmax is undefined) but whose target is ignored adds
    nothing: its NaN softmax row must not reach the weight gradient (through the dW product it would make every
    element NaN). Gradients against float64 over the other rows; the ignored row's dhidden is 0."""
    N, H, V = 5, 6, 37
    gen = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen) / H**0.5
    hidden[2], weight[3] = 1e38, 1.0  # row 2's logit 3 overflows to +inf (6e38)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[2] = -100
    if layout is not None:
        monkeypatch.setattr(rpo_fast.chunked, "choose_layout", lambda *args: layout)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    impl = "triton" if backward == "atomic" else "torch"
    lp = rpo_fast.linear_logprobs(*leaves, targets, impl=impl, backward=backward)
    lp.sum().backward()
    kept = torch.arange(N) != 2
    ref_leaves = [hidden[kept].double().requires_grad_(), weight.double().requires_grad_()]
    logprobs64(*ref_leaves, None, targets[kept]).sum().backward()
    naive_leaves = [hidden[kept].clone().requires_grad_(), weight.clone().requires_grad_()]
    naive_logprobs(*naive_leaves, None, targets[kept]).sum().backward()
    assert lp[2] == 0 and torch.isfinite(lp).all()
    assert torch.all(leaves[0].grad[2] == 0)
    assert_within("d_hidden", leaves[0].grad[kept], ref_leaves[0].grad, naive_leaves[0].grad, torch.float32,
                  rowwise=True, min_scale=1e-3)
    assert_within("d_weight", leaves[1].grad, ref_leaves[1].grad, naive_leaves[1].grad, torch.float32,
                  rowwise=True, min_scale=1e-3)


@pytest.mark.parametrize("cuda_branch", [False, True])
def test_fwdgrad_ignores_a_position_with_overflowing_logits(cuda_branch, monkeypatch):
    """The same position in the fused loss's default backward (fwdgrad): its gradient row (weight 0, undefined
    log-softmax) must be zeroed before the dW product, by the CPU's read-and-index and by the fill CUDA runs
    instead (`rpo_fast.host_sync`: taken here by answering as for CUDA; pinning is CUDA-only, so a no-op)."""
    from rpo_fast import host_sync

    if cuda_branch:
        monkeypatch.setattr(host_sync, "waits_for_host_reads", lambda device: True)
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    N, H, V = 9, 6, 37
    gen = torch.Generator().manual_seed(11)
    hidden, weight = torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen) / H**0.5
    hidden[2], weight[3] = 1e38, 1.0  # row 2's logit 3 overflows to +inf
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[2] = -100
    cu_seqlens = torch.tensor([0, 3, 5, 7, 9], dtype=torch.int32)  # 2 pairs; row 2 in the first chosen response
    options = dict(beta=0.5, alpha=1.0, sft_norm="token_mean", loss_type="sigmoid", label_smoothing=0.0,
                   average_log_prob=False)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    out = rpo_fast.fused_linear_rpo_loss(*leaves, targets, cu_seqlens, impl="torch", backward="fwdgrad",
                                         chunk_tokens=4, **options)
    out.loss.backward()
    kept = torch.arange(N) != 2
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp64 = torch.zeros(N, dtype=torch.float64).masked_scatter(kept, logprobs64(h64[kept], w64, None, targets[kept]))
    exp = rpo64(lp64, None, targets, cu_seqlens, **options)
    exp["loss"].backward()
    assert_close(out.loss, exp["loss"], atol=1e-6, rtol=1e-5, name="loss")
    assert torch.all(leaves[0].grad[2] == 0) and torch.isfinite(leaves[1].grad).all()
    assert_close(leaves[0].grad[kept], h64.grad[kept], atol=1e-5, rtol=1e-4, name="d_hidden")
    assert_close(leaves[1].grad, w64.grad, atol=1e-5, rtol=1e-4, name="d_weight")


@pytest.mark.parametrize("backward", ["fwdgrad", "recompute"])
def test_sums_over_a_very_long_sequence_are_correctly_rounded(backward):
    """A 131072-token chosen response (log-probs ~-2.8 each): its sum, the reference's and the token count are
    the float64 sums rounded once to fp32 (within 1 ulp). Summed one token at a time in fp32 (`index_add`) they
    were ~0.7 nats off at this length, noise in the DPO logit once the policy leaves its reference."""
    T, H, V = 131072, 8, 16
    g = torch.Generator().manual_seed(0)
    hidden, ref_hidden = torch.randn(2, T + 1000, H, generator=g)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (T + 1000,), generator=g)
    cu = torch.tensor([0, T, T + 1000], dtype=torch.int32)
    out = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, ref_hidden=ref_hidden, ref_weight=weight,
                                         impl="torch", backward=backward)
    for name, got, lp in [("policy", out.chosen_logps, logprobs64(hidden, weight.detach(), None, targets)),
                          ("reference", out.ref_chosen_logps, logprobs64(ref_hidden, weight.detach(), None, targets))]:
        exact = lp[:T].sum()
        assert exact < -3e5  # where an fp32 ulp is >= 0.03
        ulp = float(torch.nextafter(exact.float(), torch.tensor(0.0)) - exact.float()).__abs__()
        assert abs(float(got[0]) - float(exact)) <= ulp, f"{name} sum off by {float(got[0]) - float(exact):.4f}"
    assert out.chosen_token_counts[0] == T
