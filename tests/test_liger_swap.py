"""Code written for Liger's LigerFusedLinearDPOLoss runs unchanged with rpo_fast.RPOLoss, with the same results.

`train_steps` below is an ordinary Liger training loop; the only thing the test changes is the class it is
handed. Liger runs on CPU with compiled=False.
"""
import copy

import pytest
import torch

import rpo_fast

liger_dpo = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed")



class TinyLM(torch.nn.Module):
    """A backbone (embedding + MLP) and a biased LM head; vocab 131, hidden 24."""

    def __init__(self, vocab=131, hidden=24):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.Tanh())
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=True)

    def backbone(self, input_ids):
        return self.mlp(self.embed(input_ids))


def train_steps(loss_cls, policy, ref, batches, **loss_options):
    """A Liger-style DPO/RPO loop: backbone -> fused linear + preference loss on lm_head.weight -> AdamW."""
    loss_fn = loss_cls(beta=0.1, compiled=False, **loss_options)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    history = []
    for input_ids, labels in batches:  # [2B, T], chosen rows first; labels -100 on prompt and padding
        hidden = policy.backbone(input_ids)[:, :-1]
        target = labels[:, 1:]
        ref_kwargs = {}
        if loss_fn.use_ref_model:
            with torch.no_grad():
                ref_kwargs = dict(ref_input=ref.backbone(input_ids)[:, :-1], ref_weight=ref.lm_head.weight,
                                  ref_bias=ref.lm_head.bias)
        loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
               chosen_rewards, rejected_rewards) = loss_fn(policy.lm_head.weight, hidden, target,
                                                           policy.lm_head.bias, **ref_kwargs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({name: value.detach().clone() for name, value in (
            ("loss", loss), ("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps),
            ("chosen_logits_mean", chosen_logits_mean), ("rejected_logits_mean", rejected_logits_mean),
            ("nll_loss", nll_loss), ("chosen_rewards", chosen_rewards), ("rejected_rewards", rejected_rewards))})
    return history


def _batches(n_batches, n_pairs, vocab, generator):
    batches = []
    for _ in range(n_batches):
        width = 12
        input_ids = torch.randint(0, vocab, (2 * n_pairs, width), generator=generator)
        labels = input_ids.clone()
        for j in range(2 * n_pairs):
            prompt = int(torch.randint(1, 5, (1,), generator=generator))
            length = int(torch.randint(prompt + 1, width + 1, (1,), generator=generator))
            labels[j, :prompt] = -100
            labels[j, length:] = -100  # right padding
        batches.append((input_ids, labels))
    return batches


@pytest.mark.parametrize("options", [
    dict(alpha=0.5, compute_nll_loss=True),  # RPO: DPO + alpha * token-mean NLL on chosen
    dict(compute_nll_loss=False),  # plain DPO
    dict(alpha=1.0, compute_nll_loss=True, use_ref_model=False),
    dict(alpha=0.25, compute_nll_loss=True, average_log_prob=True),
    dict(compute_nll_loss=True, loss_type="hinge"),
], ids=["rpo", "dpo", "ref_free", "avg_logp", "hinge"])
def test_liger_loop_runs_unchanged_with_rpo_loss(options):
    base = TinyLM()
    ref = copy.deepcopy(base).requires_grad_(False)
    batches = _batches(3, 3, 131, torch.Generator().manual_seed(2))
    runs = {}
    for cls in (liger_dpo.LigerFusedLinearDPOLoss, rpo_fast.RPOLoss):
        policy = copy.deepcopy(base)
        runs[cls.__name__] = (train_steps(cls, policy, ref, batches, **options), policy)
    (liger_hist, liger_policy), (ours_hist, ours_policy) = runs.values()
    for step, (a, b) in enumerate(zip(liger_hist, ours_hist)):
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"step {step} {name}: {m}")
    for (name, p), q in zip(liger_policy.named_parameters(), ours_policy.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
