"""An independent float64 implementation of the RPO formulas (the loss module's docstring states them),
written as plainly as possible (full logits, a Python loop over sequences and pairs), to judge every
implementation in the library. It deliberately shares no code with rpo_fast.

Each test's bound has the form `k * err(naive) + floor`: `naive_logprobs` is the naive same-dtype computation
(logits in the input dtype, everything after them in float64), so its error against `logprobs64` is what the
input dtype alone costs; `bound` and `assert_within` apply it."""

import torch
import torch.nn.functional as F

# Factor on the naive same-dtype error, and the floor per input dtype relative to the reference's largest
# magnitude. k = 3: over 40 seeds of the head tests' irregular shapes, k = 2 failed 1 case in 1920 (a row of 3
# entries where the naive error was small by chance), k = 3 none. The floors leave room for float32 accumulation
# orders and for the final rounding of a gradient to its half dtype (half an ulp: 2^-9 bf16, 2^-12 fp16), and are
# small enough that zeroing 10% of a weight gradient's entries fails (tools/zeroed_fraction.py measures the
# largest fraction that passes: at most 3.1% for bf16, 1.6% for fp16, smallest entries first).
K_NAIVE = 3.0
FLOOR = {torch.float32: 2e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def logprobs64(hidden, weight, bias, targets, ignore_index=-100):
    """[N] float64 log-probs of targets under the full float64 logits; 0 at ignored targets."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    keep = targets != ignore_index
    picked = torch.log_softmax(logits, dim=-1).gather(1, torch.where(keep, targets, 0)[:, None])[:, 0]
    return torch.where(keep, picked, torch.zeros((), dtype=torch.float64))


def rpo64(lp, ref_lp_seq, targets, cu_seqlens, *, beta, alpha, sft_norm, loss_type, label_smoothing,
          average_log_prob, ignore_index=-100):
    """lp: [N] float64 per-token log-probs (graph-connected); ref_lp_seq: [2B] float64 summed or None."""
    bounds = [int(x) for x in cu_seqlens]
    n_seqs = len(bounds) - 1
    B = n_seqs // 2
    s, n = [], []
    for j in range(n_seqs):
        sl = slice(bounds[j], bounds[j + 1])
        s.append(lp[sl].sum())
        n.append(float((targets[sl] != ignore_index).sum()))
    ref = [torch.zeros((), dtype=torch.float64)] * n_seqs if ref_lp_seq is None else list(ref_lp_seq.double())
    per_token = average_log_prob or loss_type == "ipo"
    pref = []
    chosen_rewards, rejected_rewards = [], []
    for i in range(B):
        c, r = i, B + i
        sc, sr = (s[c] / n[c], s[r] / n[r]) if per_token else (s[c], s[r])
        rc, rr = (ref[c] / n[c], ref[r] / n[r]) if per_token else (ref[c], ref[r])
        z = beta * ((sc - rc) - (sr - rr))
        if loss_type == "sigmoid":
            l = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        elif loss_type == "hinge":
            l = torch.relu(1 - z)
        else:
            l = (z / beta - 1 / (2 * beta)) ** 2
        pref.append(l)
        chosen_rewards.append(beta * (sc - rc))
        rejected_rewards.append(beta * (sr - rr))
    pref_loss = sum(pref) / B
    if sft_norm == "sum":
        nll = -sum(s[:B]) / B
    elif sft_norm == "seq_mean":
        nll = -sum(s[i] / n[i] for i in range(B)) / B
    else:
        nll = -sum(s[:B]) / sum(n[:B])
    loss = pref_loss + alpha * nll
    return {
        "loss": loss, "pref_loss": pref_loss, "nll": nll,
        "chosen_logps": torch.stack(s[:B]), "rejected_logps": torch.stack(s[B:]),
        "chosen_rewards": torch.stack(chosen_rewards), "rejected_rewards": torch.stack(rejected_rewards),
        "ref_chosen_logps": torch.stack(ref[:B]), "ref_rejected_logps": torch.stack(ref[B:]),
        "chosen_token_counts": torch.tensor(n[:B], dtype=torch.float64),
        "rejected_token_counts": torch.tensor(n[B:], dtype=torch.float64),
    }


def random_pairs(n_pairs, max_len, *, min_len=1, generator=None):
    """Random cu_seqlens for 2B sequences with lengths in [min_len, max_len]."""
    lengths = torch.randint(min_len, max_len + 1, (2 * n_pairs,), generator=generator)
    cu = torch.zeros(2 * n_pairs + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return cu




def naive_logprobs(hidden, weight, bias, targets, ignore_index=-100):
    """[N] float64: the naive same-dtype computation. The logits are formed in the inputs' dtype, as a model
    forms them; the log-softmax and gather run in float64. Differentiable: its gradients flow back through the
    same-dtype matmul, so they are rounded to the inputs' dtype as a plain autograd head rounds them."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    keep = targets != ignore_index
    picked = torch.log_softmax(logits.double(), dim=-1).gather(1, torch.where(keep, targets, 0)[:, None])[:, 0]
    return torch.where(keep, picked, torch.zeros((), dtype=torch.float64))


def max_abs_err(actual, expected) -> float:
    return (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0


def bound(naive_err, magnitude, dtype, *, k=K_NAIVE, min_scale=1.0):
    """`k * err(naive) + floor`: the floor is FLOOR[dtype] times the reference's largest magnitude (at least
    `min_scale`). Works elementwise on tensors of per-row errors and magnitudes too."""
    if isinstance(magnitude, torch.Tensor):
        return k * naive_err + FLOOR[dtype] * magnitude.clamp(min=min_scale)
    return k * naive_err + FLOOR[dtype] * max(min_scale, magnitude)


def row_errors(actual, expected):
    """Largest |actual - expected| in each row (first dimension) of a 2-D tensor; a 1-D tensor is one row."""
    diff = (actual.double() - expected.double()).abs()
    return diff.amax(dim=1) if diff.dim() == 2 else diff.max().reshape(1)


def row_bounds(ref, naive, dtype, *, k=K_NAIVE):
    """Per-row bounds of a 2-D gradient: k * the naive computation's error in the row (at least the naive
    computation's relative error in 9 rows of 10 times the row's magnitude: a row of a few entries can come
    out of the naive computation exact by chance) + FLOOR[dtype] * the row's magnitude (at least 1% of the largest)."""
    magnitudes = ref.double().abs().amax(dim=1)
    naive_err = row_errors(naive, ref)
    typical = (naive_err / magnitudes.clamp(min=1e-300)).quantile(0.9)
    # A row's floor is relative to at least 1% of the largest row: a row that is small by cancellation (a token's
    # dhidden where onehot and softmax nearly cancel) still carries the float32 rounding of its large terms.
    return bound(torch.maximum(naive_err, typical * magnitudes), magnitudes, dtype, k=k,
                 min_scale=1e-2 * magnitudes.max().item())


def assert_within(name, got, ref, naive, dtype, *, k=K_NAIVE, min_scale=1.0, rowwise=False):
    """Asserts max|got - ref| <= k * max|naive - ref| + FLOOR[dtype] * max(min_scale, max|ref|).

    With `rowwise` (gradients) the same holds in every row on its own, the floor relative to that row's largest
    magnitude: a weight gradient's rows differ in scale by orders of magnitude (a target token's row against a
    row of small probabilities), and a bound set by the largest row would let the small rows be anything."""
    got, ref, naive = got.detach(), ref.detach(), naive.detach()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if not rowwise or ref.dim() != 2:
        err, naive_err = max_abs_err(got, ref), max_abs_err(naive, ref)
        limit = bound(naive_err, ref.abs().max().item() if ref.numel() else 0.0, dtype, k=k, min_scale=min_scale)
        assert err <= limit, (f"{name}: error {err:.3g} > bound {limit:.3g} = {k} x naive {dtype} error "
                              f"{naive_err:.3g} + floor (got {got.flatten()[:6].tolist()}, "
                              f"want {ref.flatten()[:6].tolist()})")
        return
    limits = row_bounds(ref, naive, dtype, k=k)
    err, naive_err = row_errors(got, ref), row_errors(naive, ref)
    bad = (err > limits).nonzero()[:, 0]
    assert bad.numel() == 0, (f"{name}: {bad.numel()} of {err.numel()} rows over the bound; row {int(bad[0])}: "
                              f"error {err[bad[0]]:.3g} > bound {limits[bad[0]]:.3g} = {k} x naive {dtype} error "
                              f"{naive_err[bad[0]]:.3g} + floor (largest |ref| in the row "
                              f"{ref[bad[0]].abs().max():.3g})")
