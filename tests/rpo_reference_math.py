"""An independent float64 implementation of the formulas in DESIGN.md, written as plainly as possible
(full logits, a Python loop over sequences and pairs), to judge every implementation in the library.
It deliberately shares no code with rpo_fast."""

import torch
import torch.nn.functional as F


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
    }


def random_pairs(n_pairs, max_len, *, min_len=1, generator=None):
    """Random cu_seqlens for 2B sequences with lengths in [min_len, max_len]."""
    lengths = torch.randint(min_len, max_len + 1, (2 * n_pairs,), generator=generator)
    cu = torch.zeros(2 * n_pairs + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return cu


