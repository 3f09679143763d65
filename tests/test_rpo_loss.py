"""fused_linear_rpo_loss against the independent float64 formulas of tests/rpo_reference_math.py: every loss
type, SFT normalization, reference mode, average_log_prob and label smoothing, on all three implementations,
with loss, metrics, token counts and gradients checked; plus a hypothesis property test over random shapes.

Each value passes when its error against float64 is at most 3 times the error of the naive same-dtype computation
(logits in the input dtype, the rest in float64, written in the test) plus a small floor: no path of the library
judges another."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rpo_fast
import rpo_fast.chunked
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


def actual(cu, hidden, weight, b, targets, ref, opts, impl):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    ref = {k: (v.detach().clone().requires_grad_() if v is not None and v.is_floating_point() else v)
           for k, v in ref.items()}
    out = rpo_fast.fused_linear_rpo_loss(leaves[0], leaves[1], targets, cu, bias=leaves[2], impl=impl, **ref, **opts)
    out.loss.backward(torch.tensor(UPSTREAM))  # a loss inside a larger graph: its gradients scale
    for k, v in ref.items():  # the reference is a constant: no gradient may flow into it
        assert v is None or v.grad is None, f"gradient flowed into {k}"
    return out, [t.grad if t is not None else None for t in leaves]


FIELDS = ["loss", "pref_loss", "nll", "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
          "chosen_rewards", "rejected_rewards", "chosen_token_counts", "rejected_token_counts"]


def check_against_float64(case, opts, impl, dtype):
    exp, exp_grads = reference64(*case, opts)
    naive, naive_grads = reference64(*case, opts, logprobs=naive_logprobs)
    got, got_grads = actual(*case, opts, impl)
    for f in FIELDS:
        assert_within(f"{impl} {f}", getattr(got, f), exp[f], naive[f], dtype)
    for name, g, n, e in zip(("d_hidden", "d_weight", "d_bias"), got_grads, naive_grads, exp_grads):
        if e is not None:
            assert g.dtype == dtype, name
            assert_within(f"{impl} {name}", g, e, n, dtype, min_scale=1e-3, rowwise=True)


@pytest.mark.parametrize("impl", ["triton", "torch", "dense"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("sft_norm", ["sum", "seq_mean", "token_mean"])
@pytest.mark.parametrize("ref_mode", ["none", "head", "logps"])
def test_loss_types_norms_and_references(impl, loss_type, sft_norm, ref_mode):
    case = make_case(B=3, max_len=9, H=21, V=67, dtype=torch.float32, bias=True, ref_mode=ref_mode)
    opts = dict(beta=0.3, alpha=0.7, sft_norm=sft_norm, loss_type=loss_type,
                label_smoothing=0.1 if loss_type == "sigmoid" else 0.0, average_log_prob=False)
    check_against_float64(case, opts, impl, torch.float32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("average_log_prob", [False, True], ids=["sum_logp", "avg_logp"])
def test_dtypes_bias_and_average_log_prob(impl, dtype, bias, average_log_prob, monkeypatch):
    monkeypatch.setattr(rpo_fast.chunked, "CHUNK_ELEMENTS", 16 * 301)  # torch: chunks of 16 tokens, one ragged
    case = make_case(B=2, max_len=40, H=75, V=301, dtype=dtype, bias=bias, ref_mode="head")
    opts = dict(beta=0.1, alpha=1.0, sft_norm="token_mean", loss_type="sigmoid", label_smoothing=0.0,
                average_log_prob=average_log_prob)
    check_against_float64(case, opts, impl, dtype)


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
    check_against_float64(case, opts, impl, torch.float32)


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


def test_alpha_zero_is_plain_dpo_and_alpha_adds_nll():
    case = make_case(B=2, max_len=6, H=8, V=20, dtype=torch.float32, bias=False, ref_mode="logps")
    cu, hidden, weight, b, targets, ref = case
    dpo = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, alpha=0.0, **ref)
    rpo = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, alpha=2.0, sft_norm="sum", **ref)
    torch.testing.assert_close(dpo.loss, dpo.pref_loss)
    torch.testing.assert_close(rpo.loss, rpo.pref_loss + 2.0 * rpo.nll)
    torch.testing.assert_close(rpo.nll, -rpo.chosen_logps.mean())


def test_hand_computed_two_pair_example():
    """Two pairs with known log-prob sums: V=2, zero weights, so every token has log-prob log(1/2)."""
    hidden = torch.zeros(7, 3)
    weight = torch.zeros(2, 3)
    targets = torch.tensor([0, 1, 1, 0, 1, 0, -100])
    cu = torch.tensor([0, 1, 3, 5, 7], dtype=torch.int32)  # chosen: 1 and 2 tokens; rejected: 2 and 1 scored
    ref = torch.tensor([-1.0, -1.0, -2.0, -2.0])
    out = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, ref_logps=ref, beta=0.5, alpha=1.0,
                                         sft_norm="seq_mean")
    ln2 = torch.log(torch.tensor(2.0))
    s = torch.stack([-ln2, -2 * ln2, -2 * ln2, -ln2])
    z = 0.5 * ((s[:2] - ref[:2]) - (s[2:] - ref[2:]))
    pref = -torch.nn.functional.logsigmoid(z).mean()
    nll = ln2  # every chosen token costs log 2, so the per-sequence mean is log 2
    torch.testing.assert_close(out.chosen_logps, s[:2])
    torch.testing.assert_close(out.loss, pref + nll)
    torch.testing.assert_close(out.chosen_rewards, 0.5 * (s[:2] - ref[:2]))


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
