"""fused_linear_rpo_loss against the independent float64 formulas of tests/rpo_reference_math.py: every loss
type, SFT normalization, reference mode, average_log_prob and label smoothing, on all three implementations,
with loss, metrics, token counts and gradients checked; plus a hypothesis property test over random shapes.

Each value passes when its error against float64 is at most 3 times the error of the naive same-dtype computation
(logits in the input dtype, the rest in float64, written in the test) plus a small floor: no path of the library
judges another.

On CPU tensors fused_linear_rpo_loss runs fwdgrad's per-row passes as torch ops even for impl="triton" (the
Triton row kernels are picked only for CUDA tensors); `triton_row_passes` makes "triton" cases run those kernels in
the interpreter, so the row passes a GPU runs by default are judged against float64 too: the property test and the
hinge and alpha=0 cases, and (at ~0.4-1 s a case) a subset of each matrix, named where it is picked."""
import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rpo_fast
import rpo_fast.chunked
from rpo_fast import fwdgrad
from rpo_fast import loss as loss_module
from rpo_reference_math import assert_within, logprobs64, naive_logprobs, random_pairs, rpo64


def make_case(B, max_len, H, V, dtype, bias, ref_mode, ignore_frac=0.25, min_len=1):
    cu = random_pairs(B, max_len, min_len=min_len)
    N = int(cu[-1])
    hidden = torch.randn(N, H).to(dtype)
    weight = (torch.randn(V, H) / H**0.5).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,))
    targets[torch.rand(N) < ignore_frac] = -100
    targets[cu[:-1][cu[:-1] < cu[1:]].long()] = torch.randint(0, V, (1,))  # each non-empty sequence scores a token
    ref = {}
    if ref_mode == "head":
        ref = dict(ref_hidden=torch.randn(N, H + 3).to(dtype), ref_weight=(torch.randn(V, H + 3) / H**0.5).to(dtype),
                   ref_bias=torch.randn(V).to(dtype) if bias else None)
    elif ref_mode == "logps":
        ref = dict(ref_logps=-torch.rand(2 * B) * 20)
    return cu, hidden, weight, b, targets, ref


# The upstream gradient every check backpropagates (a power of two: scaling by it rounds nothing), so a path
# that forms its gradients before backward must still scale them by it.
UPSTREAM = 0.5


def reference64(cu, hidden, weight, b, targets, ref, opts, logprobs=logprobs64):
    """The float64 formulas on log-probs from `logprobs` (logprobs64: exact; naive_logprobs: the same-dtype
    logits), with gradients with respect to hidden, weight, bias."""
    leaves = [(t.double() if logprobs is logprobs64 else t.detach().clone()).requires_grad_() if t is not None
              else None for t in (hidden, weight, b)]
    lp = logprobs(*leaves, targets)
    ref_seq = None
    if "ref_hidden" in ref:
        ref_lp = logprobs(ref["ref_hidden"], ref["ref_weight"], ref["ref_bias"], targets)
        ref_seq = torch.stack([ref_lp[int(cu[j]):int(cu[j + 1])].sum() for j in range(len(cu) - 1)])
    elif "ref_logps" in ref:
        ref_seq = ref["ref_logps"].double()
    out = rpo64(lp, ref_seq, targets, cu, **opts)
    (out["loss"] * UPSTREAM).backward()
    return out, [t.grad if t is not None else None for t in leaves]


@contextlib.contextmanager
def triton_row_passes(on):
    """With `on`, the forward-time-gradient head with the Triton row kernels (kernels/logit_grad.py, interpreted),
    as fused_linear_rpo_loss picks them for CUDA tensors. Yields the list of calls that took them."""
    calls = []
    if not on:
        yield calls
        return
    pytest.importorskip("triton")
    real = fwdgrad.fwdgrad_head_loss

    def with_kernels(*args, **kwargs):
        calls.append(kwargs.get("use_kernels"))
        return real(*args, **{**kwargs, "use_kernels": True})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loss_module, "fwdgrad_head_loss", with_kernels)
        yield calls


def actual(cu, hidden, weight, b, targets, ref, opts, impl, row_kernels=True):
    """fused_linear_rpo_loss's outputs and gradients; impl="triton" with `row_kernels` runs the Triton row kernels."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    ref = {k: (v.detach().clone().requires_grad_() if v is not None and v.is_floating_point() else v)
           for k, v in ref.items()}
    kernels = impl == "triton" and row_kernels
    with triton_row_passes(kernels) as kernel_calls:
        out = rpo_fast.fused_linear_rpo_loss(leaves[0], leaves[1], targets, cu, bias=leaves[2], impl=impl, **ref,
                                             **opts)
        out.loss.backward(torch.tensor(UPSTREAM))  # a loss inside a larger graph: its gradients scale
    assert kernel_calls or not kernels, "the forward-time-gradient head did not run"
    for k, v in ref.items():  # the reference is a constant: no gradient may flow into it
        assert v is None or v.grad is None, f"gradient flowed into {k}"
    return out, [t.grad if t is not None else None for t in leaves]


FIELDS = ["loss", "pref_loss", "nll", "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
          "chosen_rewards", "rejected_rewards", "chosen_token_counts", "rejected_token_counts"]


def check_against_float64(case, opts, impl, dtype, row_kernels=True):
    exp, exp_grads = reference64(*case, opts)
    naive, naive_grads = reference64(*case, opts, logprobs=naive_logprobs)
    got, got_grads = actual(*case, opts, impl, row_kernels)
    for f in FIELDS:
        assert_within(f"{impl} {f}", getattr(got, f), exp[f], naive[f], dtype)
    for name, g, n, e in zip(("d_hidden", "d_weight", "d_bias"), got_grads, naive_grads, exp_grads):
        if e is not None:
            assert g.dtype == dtype, name
            assert_within(f"{impl} {name}", g, e, n, dtype, min_scale=1e-3, rowwise=True)


LOSS_TYPES = ["sigmoid", "hinge", "ipo"]
SFT_NORMS = ["sum", "seq_mean", "token_mean"]
REF_MODES = ["none", "head", "logps"]


@pytest.mark.parametrize("impl", ["triton", "torch", "dense"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("sft_norm", SFT_NORMS)
@pytest.mark.parametrize("ref_mode", REF_MODES)
def test_loss_types_norms_and_references(impl, loss_type, sft_norm, ref_mode):
    """Every loss type, SFT normalization and reference mode against float64. impl="triton" runs the Triton row
    kernels (interpreted, ~0.4 s a case) on a Latin square of the matrix: every loss type with every sft_norm once,
    each of them with every reference mode; its other cases differ from "torch" only in the reference head."""
    case = make_case(B=3, max_len=9, H=21, V=67, dtype=torch.float32, bias=True, ref_mode=ref_mode)
    opts = dict(beta=0.3, alpha=0.7, sft_norm=sft_norm, loss_type=loss_type,
                label_smoothing=0.1 if loss_type == "sigmoid" else 0.0, average_log_prob=False)
    latin = (LOSS_TYPES.index(loss_type) + SFT_NORMS.index(sft_norm)) % 3 == REF_MODES.index(ref_mode)
    check_against_float64(case, opts, impl, torch.float32, row_kernels=latin)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("average_log_prob", [False, True], ids=["sum_logp", "avg_logp"])
def test_dtypes_bias_and_average_log_prob(impl, dtype, bias, average_log_prob, monkeypatch):
    """Each input dtype, with and without bias and average_log_prob, against float64, the batch in chunks of at
    most 16 rows on every head. impl="triton" runs the Triton row kernels (~1 s a case) for bf16 and fp32 with
    bias and average_log_prob both off or both on."""
    rows = 16
    # The op (the reference head; fp16's recompute backward): chunks of 16 tokens, one ragged.
    monkeypatch.setattr(rpo_fast.chunked, "CHUNK_ELEMENTS", rows * 301)
    # fwdgrad (bf16, fp32): chunks of whole pairs of at most 16 rows, longer pairs in pieces of 16.
    monkeypatch.setattr(fwdgrad, "FWDGRAD_CHUNK_ELEMENTS", rows * 301)
    pieces = []
    real_row_pieces = fwdgrad.row_pieces
    monkeypatch.setattr(fwdgrad, "row_pieces", lambda *args: pieces.append(real_row_pieces(*args)) or pieces[-1])
    case = make_case(B=2, max_len=40, H=75, V=301, dtype=dtype, bias=bias, ref_mode="head")
    opts = dict(beta=0.1, alpha=1.0, sft_norm="token_mean", loss_type="sigmoid", label_smoothing=0.0,
                average_log_prob=average_log_prob)
    check_against_float64(case, opts, impl, dtype,
                          row_kernels=dtype in (torch.float32, torch.bfloat16) and bias == average_log_prob)
    n_logits_pieces = sum(len(p) for p in pieces)  # the fwdgrad head's logits products in its first pass
    if dtype == torch.float16:  # backward="auto" takes recompute for fp16
        assert n_logits_pieces == 0
    else:
        assert n_logits_pieces >= max(2, math.ceil(int(case[0][-1]) / rows)), pieces


def ignore_inside(case):
    """The case with the middle token of every sequence of 3 or more ignored: chosen and rejected responses
    alike have gaps, so their token counts differ from their lengths."""
    cu, hidden, weight, b, targets, ref = case
    targets = targets.clone()
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if end - start >= 3:
            targets[(start + end) // 2] = -100
    return cu, hidden, weight, b, targets, ref


@pytest.mark.parametrize("impl", ["triton", "torch", "dense"])
@pytest.mark.parametrize("ref_mode, options", [
    ("head", dict(label_smoothing=0.3)),  # cDPO's two weights differ: a swap or a dropped term shows
    ("none", dict(label_smoothing=0.15, alpha=2.5)),
    ("logps", dict(loss_type="ipo")),
    ("none", dict(loss_type="ipo", sft_norm="sum")),
    ("head", dict(loss_type="ipo", average_log_prob=True, sft_norm="token_mean")),
    ("logps", dict(average_log_prob=True)),
    ("head", dict(average_log_prob=True, loss_type="hinge")),
    ("logps", dict(sft_norm="sum", alpha=2.5)),
    ("head", dict(sft_norm="seq_mean", alpha=0.25)),
    ("logps", dict(sft_norm="token_mean", alpha=4.0)),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_loss_options_with_ignored_tokens_inside_responses(impl, ref_mode, options):
    """Each option on a case whose chosen and rejected responses both have ignored tokens inside them (token
    counts != lengths), so per-token averages and the seq_mean/token_mean NLL depend on the counts."""
    case = ignore_inside(make_case(B=3, max_len=9, H=13, V=41, dtype=torch.float32, bias=False, ref_mode=ref_mode,
                                   ignore_frac=0.0, min_len=3))
    cu, targets = case[0], case[4]
    lengths = (cu[1:] - cu[:-1]).float()
    assert all(n < length for n, length in zip((targets != -100).float().tolist(), lengths.tolist()) if length >= 3)
    opts = dict(beta=0.2, alpha=0.7, sft_norm="seq_mean", loss_type="sigmoid", label_smoothing=0.0,
                average_log_prob=False) | options
    # The Triton row kernels (impl="triton") on two of the options: the row passes do not see the options.
    check_against_float64(case, opts, impl, torch.float32,
                          row_kernels=options in (dict(label_smoothing=0.3), dict(average_log_prob=True)))


@pytest.mark.parametrize("impl", ["triton", "torch", "dense"])
def test_hinge_near_its_kink(impl):
    """Pairs with z = 1 +- 1e-3 (the reference log-probs are set to put them there): relu(1 - z) is 1e-3 or 0,
    and the gradient flows through the second pair only. A hinge off by a constant, or on the wrong side, fails."""
    case = make_case(B=3, max_len=8, H=11, V=37, dtype=torch.float32, bias=True, ref_mode="none")
    cu, hidden, weight, b, targets, _ = case
    beta = 0.5
    s = logprobs64(hidden, weight, b, targets)
    seq = torch.stack([s[int(cu[j]):int(cu[j + 1])].sum() for j in range(len(cu) - 1)])
    z = torch.tensor([1 + 1e-3, 1 - 1e-3, 1.05], dtype=torch.float64)
    ref_logps = torch.cat([seq[:3] - seq[3:] - z / beta, torch.zeros(3, dtype=torch.float64)])  # z = beta * (...)
    opts = dict(beta=beta, alpha=0.0, sft_norm="token_mean", loss_type="hinge", label_smoothing=0.0,
                average_log_prob=False)
    case = (cu, hidden, weight, b, targets, dict(ref_logps=ref_logps.float()))
    check_against_float64(case, opts, impl, torch.float32)
    out = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, bias=b, ref_logps=ref_logps.float(), impl=impl,
                                         **opts)
    assert abs(out.pref_loss.item() - 1e-3 / 3) < 1e-4


@pytest.mark.parametrize("impl", ["triton", "torch", "dense"])
def test_alpha_zero_is_plain_dpo_and_alpha_adds_nll(impl):
    """alpha=0 is plain DPO (loss, metrics and gradients against float64; its nll a metric in the same sft_norm),
    and alpha only adds alpha * NLL: the preference term at alpha=2 is the one at alpha=0."""
    case = make_case(B=2, max_len=6, H=8, V=20, dtype=torch.float32, bias=False, ref_mode="logps")
    cu, hidden, weight, b, targets, ref = case
    opts = dict(beta=0.1, alpha=0.0, sft_norm="token_mean", loss_type="sigmoid", label_smoothing=0.0,
                average_log_prob=False)
    check_against_float64(case, opts, impl, torch.float32)
    dpo = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, impl=impl, **ref, **opts)
    rpo = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, impl=impl, **ref, **(opts | dict(alpha=2.0,
                                                                                                     sft_norm="sum")))
    torch.testing.assert_close(rpo.pref_loss, dpo.pref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(dpo.loss, dpo.pref_loss)
    torch.testing.assert_close(rpo.loss, rpo.pref_loss + 2.0 * rpo.nll)
    torch.testing.assert_close(rpo.nll, -rpo.chosen_logps.mean())
    # The nll metric of a plain-DPO run is in its sft_norm, as an RPO run's is (a DPO baseline is compared with
    # an RPO run of the same config): at alpha=0 as at alpha=2.
    for sft_norm in ("sum", "seq_mean", "token_mean"):
        both = [rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, impl=impl, **ref,
                                               **(opts | dict(alpha=alpha, sft_norm=sft_norm))) for alpha in (0.0, 2.0)]
        torch.testing.assert_close(both[0].nll, both[1].nll, msg=sft_norm)


@pytest.mark.parametrize("sft_norm", ["sum", "seq_mean", "token_mean"])
def test_hand_computed_two_pair_example(sft_norm):
    """Every field of two pairs worked out by hand: V=2, zero hidden states and bias (0, log 3), so a token has
    log-prob log(1/4) for target 0 and log(3/4) for target 1; chosen sequences of different per-token means
    (and a rejected one with an ignored token) tell the three SFT normalizations apart."""
    hidden = torch.zeros(7, 3)
    weight = torch.randn(2, 3)  # times zero hidden states: the logits are the bias
    bias = torch.tensor([0.0, math.log(3.0)])
    targets = torch.tensor([0, 1, 1, 0, 1, 0, -100])
    cu = torch.tensor([0, 1, 3, 5, 7], dtype=torch.int32)  # chosen: 1 and 2 tokens; rejected: 2 and 1 scored
    ref = [-1.0, -1.0, -2.0, -2.0]
    out = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, bias=bias, ref_logps=torch.tensor(ref),
                                         beta=0.5, alpha=1.5, sft_norm=sft_norm)
    a, c = math.log(1 / 4), math.log(3 / 4)  # log-probs of targets 0 and 1
    s = [a, 2 * c, a + c, a]  # chosen 0, chosen 1, rejected 0, rejected 1 (its second token ignored)
    counts = [1.0, 2.0, 2.0, 1.0]
    rewards = [0.5 * (s[j] - ref[j]) for j in range(4)]
    pref = sum(math.log1p(math.exp(-(rewards[i] - rewards[2 + i]))) for i in range(2)) / 2  # -log sigmoid(z)
    nll = {"sum": -(s[0] + s[1]) / 2, "seq_mean": -(s[0] / 1 + s[1] / 2) / 2,
           "token_mean": -(s[0] + s[1]) / 3}[sft_norm]
    want = dict(loss=pref + 1.5 * nll, pref_loss=pref, nll=nll, chosen_logps=s[:2], rejected_logps=s[2:],
                ref_chosen_logps=ref[:2], ref_rejected_logps=ref[2:], chosen_rewards=rewards[:2],
                rejected_rewards=rewards[2:], chosen_token_counts=counts[:2], rejected_token_counts=counts[2:])
    for f in FIELDS:
        torch.testing.assert_close(getattr(out, f).double(), torch.tensor(want[f], dtype=torch.float64), rtol=1e-6,
                                   atol=1e-6, msg=lambda m, f=f: f"{f}: {m}")


@settings(max_examples=25, deadline=None)
@given(
    n_pairs=st.integers(1, 3),
    max_len=st.integers(1, 12),
    H=st.integers(1, 40),
    V=st.integers(1, 150),
    impl=st.sampled_from(["triton", "torch"]),
    loss_type=st.sampled_from(["sigmoid", "hinge", "ipo"]),
    sft_norm=st.sampled_from(["sum", "seq_mean", "token_mean"]),
    ref_mode=st.sampled_from(["none", "head", "logps"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(n_pairs, max_len, H, V, impl, loss_type, sft_norm, ref_mode, bias, seed):
    torch.manual_seed(seed)
    case = make_case(B=n_pairs, max_len=max_len, H=H, V=V, dtype=torch.float32, bias=bias, ref_mode=ref_mode)
    opts = dict(beta=0.2, alpha=0.5, sft_norm=sft_norm, loss_type=loss_type, label_smoothing=0.0,
                average_log_prob=False)
    check_against_float64(case, opts, impl, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backward", ["fwdgrad", "recompute"])
def test_a_policy_equal_to_its_reference_has_rewards_of_exactly_zero(dtype, backward):
    """The reference is scored by the no-grad head, the policy by the head that forms gradients: both must take
    the same product, so that identical inputs give identical log-probs (in bf16 the no-grad head once rounded
    its logits to bf16: rewards of +-0.04 and accuracy 1.0 at step 1 of a run)."""
    torch.manual_seed(0)
    n, h_dim, vocab = 60, 64, 2000
    cu_seqlens = torch.tensor([0, 14, 30, 44, 60], dtype=torch.int32)
    hidden, weight = (torch.randn(n, h_dim) * 3).to(dtype), torch.randn(vocab, h_dim).to(dtype)
    targets = torch.randint(0, vocab, (n,))
    out = rpo_fast.fused_linear_rpo_loss(hidden.clone().requires_grad_(), weight.clone().requires_grad_(), targets,
                                         cu_seqlens, ref_hidden=hidden, ref_weight=weight, beta=0.1, alpha=1.0,
                                         sft_norm="sum", impl="torch", backward=backward)
    assert out.chosen_rewards.tolist() == [0.0, 0.0] and out.rejected_rewards.tolist() == [0.0, 0.0]
    assert torch.equal(out.chosen_logps, out.ref_chosen_logps)
