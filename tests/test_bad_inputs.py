"""Every malformed input gets a ValueError that names the argument; NaN/Inf inputs give NaN, never a
silent number."""
import math
import re

import numpy as np
import pytest
import torch

import rpo_fast


def base(B=2, L=3, H=8, V=11):
    N = 2 * B * L
    return dict(
        hidden=torch.randn(N, H), weight=torch.randn(V, H), targets=torch.randint(0, V, (N,)),
        cu_seqlens=torch.arange(0, N + 1, L, dtype=torch.int32),
    )


def call(**overrides):
    kw = base()
    kw.update(overrides)
    return rpo_fast.fused_linear_rpo_loss(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), kw.pop("cu_seqlens"), **kw)


N, H, V = 12, 8, 11
CASES = [
    # (case id, overrides, argument named in the message)
    ("hidden_1d", dict(hidden=torch.randn(N * H)), "hidden"),
    ("hidden_int", dict(hidden=torch.ones(N, H, dtype=torch.int64)), "hidden"),
    ("hidden_float64", dict(hidden=torch.randn(N, H, dtype=torch.float64)), "hidden"),
    ("weight_dtype", dict(weight=torch.randn(V, H, dtype=torch.float16)), "weight"),
    ("weight_H", dict(weight=torch.randn(V, H + 1)), "weight"),
    ("weight_no_rows", dict(weight=torch.randn(0, H)), "weight"),
    ("bias_shape", dict(bias=torch.randn(V + 1)), "bias"),
    ("bias_dtype", dict(bias=torch.randn(V, dtype=torch.bfloat16)), "bias"),
    ("targets_len", dict(targets=torch.zeros(N - 1, dtype=torch.int64)), "targets"),
    ("targets_float", dict(targets=torch.zeros(N)), "targets"),
    ("target_too_big", dict(targets=torch.full((N,), V)), "targets"),
    ("target_negative", dict(targets=torch.full((N,), -1)), "targets"),
    ("cu_float", dict(cu_seqlens=torch.arange(0, N + 1, 3).float()), "cu_seqlens"),
    ("cu_not_zero_start", dict(cu_seqlens=torch.tensor([1, 3, 6, 9, 12], dtype=torch.int32)), "cu_seqlens"),
    ("cu_not_ending_at_N", dict(cu_seqlens=torch.tensor([0, 3, 6, 9, 11], dtype=torch.int32)), "cu_seqlens"),
    ("cu_decreasing", dict(cu_seqlens=torch.tensor([0, 5, 4, 9, 12], dtype=torch.int32)), "cu_seqlens"),
    ("cu_last_span_negative", dict(cu_seqlens=torch.tensor([0, 3, 6, 13, 12], dtype=torch.int32)), "cu_seqlens"),
    ("cu_odd_count", dict(cu_seqlens=torch.tensor([0, 4, 8, 12], dtype=torch.int32)), "cu_seqlens"),
    ("cu_2d", dict(cu_seqlens=torch.zeros(2, 3, dtype=torch.int32)), "cu_seqlens"),
    ("ref_hidden_only", dict(ref_hidden=torch.randn(N, H)), "ref_weight"),
    ("ref_weight_only", dict(ref_weight=torch.randn(V, H)), "ref_hidden"),
    ("ref_bias_alone", dict(ref_bias=torch.randn(V)), "ref_bias"),
    ("ref_both_forms", dict(ref_hidden=torch.randn(N, H), ref_weight=torch.randn(V, H), ref_logps=torch.zeros(4)),
     "ref_logps"),
    ("ref_hidden_rows", dict(ref_hidden=torch.randn(N + 1, H), ref_weight=torch.randn(V, H)), "ref_hidden"),
    ("ref_weight_vocab", dict(ref_hidden=torch.randn(N, H), ref_weight=torch.randn(V + 2, H)), "ref_weight"),
    ("ref_logps_shape", dict(ref_logps=torch.zeros(3)), "ref_logps"),
    ("ref_logps_device", dict(ref_logps=torch.zeros(4, device="meta")), "ref_logps"),
    ("ref_hidden_device", dict(ref_hidden=torch.randn(N, H, device="meta"), ref_weight=torch.randn(V, H, device="meta")),
     "ref_hidden"),
    ("loss_type", dict(loss_type="robust"), "loss_type"),
    ("sft_norm", dict(sft_norm="mean"), "sft_norm"),
    ("impl", dict(impl="cuda"), "impl"),
    ("beta_zero", dict(beta=0.0), "beta"),
    ("beta_nan", dict(beta=math.nan), "beta"),
    ("beta_bool", dict(beta=True), "beta"),
    ("pair_weight_vector", dict(pair_weight=torch.ones(2)), "pair_weight"),
    ("alpha_negative", dict(alpha=-1.0), "alpha"),
    ("label_smoothing_big", dict(label_smoothing=0.7), "label_smoothing"),
    ("label_smoothing_hinge", dict(label_smoothing=0.1, loss_type="hinge"), "label_smoothing"),
]


@pytest.mark.parametrize("overrides,argument", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_value_error_naming_argument(overrides, argument):
    """With and without a gradient wanted (the fwdgrad and recompute paths check on their own ways)."""
    with pytest.raises(ValueError, match=rf"\b{argument}\b.*expected"):
        call(**overrides)
    weight = torch.randn(V, H, requires_grad=True)
    with pytest.raises(ValueError, match=rf"\b{argument}\b.*expected"):
        call(**{"weight": weight, **overrides})


def empty_sequence_targets(seq: int):
    targets = torch.randint(0, V, (N,))
    targets[3 * seq:3 * seq + 3] = -100
    return targets


@pytest.mark.parametrize("kwargs,seq", [
    (dict(sft_norm="seq_mean"), 1),          # a chosen sequence divided by its own count
    (dict(average_log_prob=True), 0),
    (dict(average_log_prob=True), 3),        # rejected sequences are averaged too
    (dict(loss_type="ipo"), 2),              # IPO always averages
])
def test_empty_sequence_that_would_be_divided_by_is_named(kwargs, seq):
    """Named by the argument the count comes from (targets, here), with both backwards."""
    for backward in ("fwdgrad", "recompute"):
        hidden = torch.randn(N, H, requires_grad=True)
        with pytest.raises(ValueError, match=rf"^targets \(counted per cu_seqlens span.*sequence {seq}\b"):
            call(hidden=hidden, targets=empty_sequence_targets(seq), backward=backward, **kwargs)


def test_empty_sequences_fine_when_nothing_divides_by_them():
    out = call(targets=empty_sequence_targets(3), sft_norm="token_mean")  # a rejected sequence with no tokens
    assert torch.isfinite(out.loss)
    assert out.rejected_logps[1] == 0


def test_all_chosen_empty_with_token_mean_is_refused():
    targets = torch.randint(0, V, (N,))
    targets[:6] = -100
    with pytest.raises(ValueError, match="token_mean"):
        call(targets=targets)
    assert torch.isfinite(call(targets=targets, alpha=0.0).loss)  # plain DPO does not divide


@pytest.mark.parametrize("number", [np.float32(0.3), np.float64(0.3), torch.tensor(0.3)], ids=["np32", "np64", "tensor"])
def test_numpy_and_tensor_scalars_are_numbers(number):
    """beta/alpha/label_smoothing/pair_weight as NumPy scalars or one-element tensors (as Liger takes them) give
    the loss of the same Python float, not an error or NumPy arithmetic on the loss's tensors."""
    expected = float(number)
    for key in ("beta", "alpha", "label_smoothing", "pair_weight", "nll_weight"):
        hidden = torch.randn(N, H, generator=torch.Generator().manual_seed(1), requires_grad=True)
        kw = base()
        kw.pop("hidden")
        got = call(hidden=hidden, **kw, **{key: number}).loss
        assert isinstance(got, torch.Tensor) and got.requires_grad, key
        torch.testing.assert_close(got, call(hidden=hidden, **kw, **{key: expected}).loss, msg=key)
    seq = dict(policy_logps=-torch.rand(4) * 10, ref_logps=-torch.rand(4) * 10, token_counts=torch.tensor([3, 4, 2, 5]))
    torch.testing.assert_close(rpo_fast.rpo_loss(**seq, beta=number).loss, rpo_fast.rpo_loss(**seq, beta=expected).loss)


@pytest.mark.parametrize("impl", ["triton", "torch", "dense"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_give_nan(impl, bad):
    hidden = torch.randn(N, H)
    hidden[4, 2] = bad
    out = call(hidden=hidden, impl=impl)
    assert torch.isnan(out.loss), f"{bad} in hidden gave loss {out.loss}"
    lp = rpo_fast.linear_logprobs(hidden, torch.randn(V, H), torch.randint(0, V, (N,)), impl=impl)
    assert torch.isnan(lp[4]) and torch.isfinite(lp[torch.arange(N) != 4]).all()


def test_linear_logprobs_validates_too():
    with pytest.raises(ValueError, match="targets.*expected"):
        rpo_fast.linear_logprobs(torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="weight.*expected"):
        rpo_fast.linear_logprobs(torch.randn(4, 3), torch.randn(5, 4), torch.zeros(4, dtype=torch.int64))


TRITON_CHOICES = [("linear_logprobs", dict(impl="triton"), "impl='triton'"),
                  ("linear_logprobs", dict(impl="torch", backward="atomic"), "backward='atomic'"),
                  ("fused_linear_rpo_loss", dict(impl="triton"), "impl='triton'"),
                  ("fused_linear_rpo_loss", dict(backward="atomic"), "backward='atomic'")]


@pytest.mark.parametrize("function,options,named", TRITON_CHOICES, ids=[f"{f}-{'-'.join(o.values())}"
                                                                       for f, o, _ in TRITON_CHOICES])
def test_triton_on_cpu_without_interpreter_is_a_clear_error_in_forward(monkeypatch, function, options, named):
    """A choice that launches Triton kernels is refused in forward, not at `.backward()`, on a CPU without the
    interpreter, and the message names that choice (the fwdgrad default would otherwise run torch passes)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden = torch.randn(4, 3, requires_grad=True)
    args = (hidden, torch.randn(5, 3), torch.zeros(4, dtype=torch.int64))
    if function == "fused_linear_rpo_loss":
        args += (torch.tensor([0, 2, 4], dtype=torch.int32),)
    with pytest.raises(ValueError, match=f"{re.escape(named)}.*expected.*use {named.split('=')[0]}='auto'"):
        getattr(rpo_fast, function)(*args, **options)


def test_rpo_loss_module_rejects_liger_only_loss_types_and_bad_shapes():
    with pytest.raises(ValueError, match="loss_type"):
        rpo_fast.RPOLoss(loss_type="apo_zero")
    with pytest.raises(ValueError, match=r"^backward: expected 'auto' with impl='dense'"):  # at construction
        rpo_fast.RPOLoss(impl="dense", backward="fwdgrad")
    loss = rpo_fast.RPOLoss(use_ref_model=False)
    with pytest.raises(ValueError, match="_input"):
        loss(torch.randn(5, 3), torch.randn(4, 3), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="target"):
        loss(torch.randn(5, 3), torch.randn(4, 2, 3), torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="ref_input"):
        rpo_fast.RPOLoss()(torch.randn(5, 3), torch.randn(4, 2, 3), torch.zeros(4, 2, dtype=torch.int64))
    # Named by the module's own arguments, not by the packed ones it passes on (cu_seqlens, ref_hidden).
    for rows in (3, 0):
        with pytest.raises(ValueError, match=r"^_input: expected a \[2B, T, H\] tensor, B >= 1"):
            loss(torch.randn(5, 3), torch.randn(rows, 2, 3), torch.zeros(rows, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^ref_input: expected a \[2B, T, H'\] tensor"):
        rpo_fast.RPOLoss()(torch.randn(5, 3), torch.randn(4, 2, 3), torch.zeros(4, 2, dtype=torch.int64),
                           ref_input=torch.randn(4, 2), ref_weight=torch.randn(5, 3))
    # The caller's target [2B, T] (the messages named the packed targets (N,) and a position among its scored entries).
    target = torch.tensor([[1, -100], [2, 3], [4, -100], [7, 0]])
    with pytest.raises(ValueError, match=r"^target: expected values in \[0, 5\) or ignore_index=-100, got 7 at "
                                         r"position \[3, 0\]"):
        loss(torch.randn(5, 3), torch.randn(4, 2, 3), target)
    with pytest.raises(ValueError, match=r"^target: expected values .*position \[3, 0\]"):  # named before the bias
        loss(torch.randn(5, 3), torch.randn(4, 2, 3), target, torch.randn(4))
    with pytest.raises(ValueError, match=r"^target: expected int32 or int64 on cpu, got \(4, 2\) float32"):
        loss(torch.randn(5, 3), torch.randn(4, 2, 3), target.float())


def sequence_logps(n=4):
    return dict(policy_logps=torch.randn(n, requires_grad=True), ref_logps=torch.randn(n),
                token_counts=torch.tensor([3, 4, 2, 5][:n] + [1] * max(0, n - 4)))


@pytest.mark.parametrize("overrides,argument", [
    (dict(ref_logps=torch.randn(1)), "ref_logps"),  # would broadcast
    (dict(token_counts=torch.tensor([3])), "token_counts"),  # would broadcast
    (dict(policy_logps=torch.randn(3)), "policy_logps"),  # odd: no pairs
    (dict(policy_logps=torch.randn(2, 2)), "policy_logps"),
    (dict(policy_logps=torch.arange(4)), "policy_logps"),  # integer
    (dict(ref_logps=torch.randn(4, device="meta")), "ref_logps"),  # another device
    (dict(token_counts=torch.ones(4, dtype=torch.bool)), "token_counts"),
    (dict(token_counts=torch.tensor([3, -1, 2, 5])), "token_counts"),
], ids=["ref_1", "counts_1", "odd", "2d", "int", "device", "bool_counts", "negative_counts"])
def test_rpo_loss_checks_its_inputs(overrides, argument):
    kw = {**sequence_logps(), **overrides}
    with pytest.raises(ValueError, match=rf"^{argument}: .*expected"):
        rpo_fast.rpo_loss(kw.pop("policy_logps"), kw.pop("ref_logps"), kw.pop("token_counts"))
    rpo_fast.rpo_loss(**sequence_logps())  # the well-formed call works


def test_rpo_loss_names_token_counts_for_an_empty_sequence():
    kw = sequence_logps()
    kw["token_counts"][1] = 0
    with pytest.raises(ValueError, match=r"^token_counts: chosen sequence 1 has no response tokens"):
        rpo_fast.rpo_loss(kw["policy_logps"], kw["ref_logps"], kw["token_counts"], sft_norm="seq_mean")


@pytest.mark.parametrize("sft_norm", ["sum", "seq_mean", "token_mean"])
def test_no_response_token_at_all_is_an_error_not_a_reference_only_loss(sft_norm):
    # Before: with sft_norm="sum" the loss was l(-beta * (ref_c - ref_r)), finite, with zero gradient.
    with pytest.raises(ValueError, match="expected response tokens in some sequence, got none in all 4"):
        call(targets=torch.full((N,), -100), ref_logps=torch.randn(4), sft_norm=sft_norm, alpha=0.0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("bad", [V, V + 7, -1])
def test_the_custom_op_validates_targets(impl, bad):
    """torch.ops.rpo_fast.linear_logprobs_fwd is public (torch.compile): called directly, it checks its targets
    rather than reading outside the weight (the Triton kernel returned garbage for them)."""
    targets = torch.randint(0, V, (N,))
    targets[5] = bad
    with pytest.raises(ValueError, match=rf"targets: expected values in \[0, {V}\) .*got {bad} at position 5"):
        torch.ops.rpo_fast.linear_logprobs_fwd(torch.randn(N, H), torch.randn(V, H), None, targets, -100, impl)
    targets[5] = -100  # ignore_index is fine
    lp, _ = torch.ops.rpo_fast.linear_logprobs_fwd(torch.randn(N, H), torch.randn(V, H), None, targets, -100, impl)
    assert lp[5] == 0 and torch.isfinite(lp).all()
