"""RPOLoss (Liger's LigerFusedLinearDPOLoss interface) with the keywords a Liger comparison cannot judge: sft_norm,
label_smoothing on "sigmoid" (Liger 0.8.5 ignores it), loss_type "ipo", backward, chunk_tokens and an ignore_index
other than -100, against the float64 formulas of tests/rpo_reference_math.py taken over each padded row's scored
tokens: the loss, the gradients of input, weight and bias, and every auxiliary output. A value passes when its error
is at most 3 times the naive same-dtype computation's plus a small floor (`assert_within`)."""
import pytest
import torch

import rpo_fast
import rpo_fast.loss
from rpo_reference_math import assert_within, logprobs64, naive_logprobs, rpo64

B, T, H, V = 3, 9, 13, 37  # 2B rows of T positions; H and V are no multiple of 16

CASES = {
    "sum-smoothed-fwdgrad-chunks": dict(sft_norm="sum", label_smoothing=0.25, backward="fwdgrad", chunk_tokens=5,
                                        ignore_index=-7),
    "seq_mean-hinge-recompute-avg": dict(sft_norm="seq_mean", loss_type="hinge", backward="recompute",
                                         average_log_prob=True, ignore_index=-1),
    "ipo-fwdgrad-no-bias": dict(loss_type="ipo", backward="fwdgrad", chunk_tokens=12, bias=False, alpha=0.4),
    "smoothed-no-nll-reference-free": dict(label_smoothing=0.4, compute_nll_loss=False, use_ref_model=False,
                                           backward="recompute", ignore_index=-1),
    "seq_mean-smoothed-triton-atomic": dict(sft_norm="seq_mean", label_smoothing=0.1, impl="triton",
                                            backward="atomic", ignore_index=-7),
}
AUX_NAMES = ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "nll_loss",
             "chosen_rewards", "rejected_rewards")


def padded_batch(ignore_index, bias, seed=0):
    """[2B, T, H] inputs whose rows differ in length: a prompt on the left and padding on the right (both
    ignore_index, with random hidden states there), and ~15% of the response positions ignored too."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * B, T, H, generator=gen)
    w = torch.randn(V, H, generator=gen) / H**0.5
    b = torch.randn(V, generator=gen) * 0.5 if bias else None
    target = torch.randint(0, V, (2 * B, T), generator=gen)
    start = torch.randint(0, 4, (2 * B,), generator=gen)
    end = torch.minimum(start + torch.randint(1, T, (2 * B,), generator=gen), torch.tensor(T))
    pos = torch.arange(T)[None, :]
    ignored = (pos < start[:, None]) | (pos >= end[:, None]) | (torch.rand(2 * B, T, generator=gen) < 0.15)
    ignored[torch.arange(2 * B), start] = False  # every row keeps a scored token
    target[ignored] = ignore_index
    rx, rw, rb = torch.randn(2 * B, T, H, generator=gen), torch.randn(V, H, generator=gen) / H**0.5, None
    if bias:
        rb = torch.randn(V, generator=gen) * 0.5
    return x, w, b, target, rx, rw, rb


def float64_outputs(opts, x, w, b, target, rx, rw, rb, *, logits_dtype=None):
    """RPOLoss's (loss, aux outputs, gradients) from rpo_reference_math over the full padded rows (an ignored
    position adds 0 to its row's sum and nothing to its count): in float64, or with `logits_dtype` the naive
    computation, whose logits are formed in that dtype."""
    ii, bias = opts.get("ignore_index", -100), b is not None
    leaves = [t.detach().clone() for t in (x, w) + ((b,) if bias else ())]
    if logits_dtype is None:
        leaves = [t.double() for t in leaves]
    leaves = [t.requires_grad_() for t in leaves]
    head = (leaves[0].reshape(-1, H), leaves[1], leaves[2] if bias else None, target.reshape(-1))
    lp = logprobs64(*head, ignore_index=ii) if logits_dtype is None else naive_logprobs(*head, ignore_index=ii)
    ref_seq = None
    if opts.get("use_ref_model", True):
        ref_seq = logprobs64(rx.reshape(-1, H), rw, rb, target.reshape(-1), ignore_index=ii).view(2 * B, T).sum(1)
    compute_nll = opts.get("compute_nll_loss", True)
    r = rpo64(lp, ref_seq, target.reshape(-1), torch.arange(0, 2 * B * T + 1, T), beta=opts.get("beta", 0.1),
              alpha=opts.get("alpha", 1.0) if compute_nll else 0.0, sft_norm=opts.get("sft_norm", "token_mean"),
              loss_type=opts.get("loss_type", "sigmoid"), label_smoothing=opts.get("label_smoothing", 0.0),
              average_log_prob=opts.get("average_log_prob", False), ignore_index=ii)
    grads = torch.autograd.grad(r["loss"], leaves)
    chosen, rejected = r["chosen_logps"], r["rejected_logps"]
    if opts.get("average_log_prob", False):
        chosen, rejected = chosen / r["chosen_token_counts"], rejected / r["rejected_token_counts"]
    with torch.no_grad():
        logits = head[0] @ head[1].T + (head[2] if bias else 0)  # every position, scored or not (Liger's mean)
        logits = logits.double().view(2 * B, T, V)
    aux = (chosen, rejected, logits[:B].mean(), logits[B:].mean(), r["nll"] if compute_nll else torch.zeros(()),
           r["chosen_rewards"], r["rejected_rewards"])
    return r["loss"].detach(), [a.detach() for a in aux], grads, r


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_rpo_loss_options_match_float64(case, monkeypatch):
    """RPOLoss applies sft_norm, label_smoothing, loss_type, average_log_prob and ignore_index as the float64
    formulas do, and hands backward and chunk_tokens to the fused loss."""
    opts = {"beta": 0.1, "alpha": 0.7, "compute_nll_loss": True, **CASES[case]}
    bias = opts.pop("bias", True)
    x, w, b, target, rx, rw, rb = padded_batch(opts.get("ignore_index", -100), bias)
    exact_loss, exact_aux, exact_grads, exact = float64_outputs(opts, x, w, b, target, rx, rw, rb)
    naive_loss, naive_aux, naive_grads, _ = float64_outputs(opts, x, w, b, target, rx, rw, rb,
                                                            logits_dtype=torch.float32)
    assert float(exact["pref_loss"].detach()) > 0.05  # hinge: a pair inside the margin, whose gradient is judged

    fused_calls = []
    real = rpo_fast.loss.fwdgrad_head_loss
    monkeypatch.setattr(rpo_fast.loss, "fwdgrad_head_loss",
                        lambda *a, **k: fused_calls.append(k["chunk_tokens"]) or real(*a, **k))
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    loss, aux = rpo_fast.RPOLoss(**opts)(leaves[1], leaves[0], target, leaves[2] if bias else None,
                                         *((rx, rw, rb) if opts.get("use_ref_model", True) else ()))
    loss.backward()
    assert fused_calls == ([opts.get("chunk_tokens")] if opts["backward"] == "fwdgrad" else [])

    dtype = torch.float32
    assert_within("loss", loss, exact_loss, naive_loss, dtype)
    assert len(aux) == len(AUX_NAMES)
    for name, got, want, naive in zip(AUX_NAMES, aux, exact_aux, naive_aux):
        assert_within(name, got.reshape(want.shape), want, naive, dtype)
    rows = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731  d_input [2B, T, H] -> one row per position
    for name, leaf, want, naive in zip(("d_input", "d_weight", "d_bias"), leaves, exact_grads, naive_grads):
        assert leaf.grad is not None and leaf.grad.dtype == dtype, name
        assert_within(name, rows(leaf.grad), rows(want), rows(naive), dtype, min_scale=1e-3, rowwise=True)
    assert torch.all(leaves[0].grad[target == opts.get("ignore_index", -100)] == 0)  # unscored positions
