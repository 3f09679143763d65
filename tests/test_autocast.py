"""The public head functions under `torch.autocast` (a trainer's mixed precision): they compute what they compute
on the inputs cast to autocast's dtype outside it (a `Linear`'s semantics), forward and backward, also when
`.backward()` runs inside the autocast region, and with a bf16 backbone's hidden states beside an fp32 weight."""
import pytest
import torch

import rpo_fast

N, H, V = 22, 12, 37
CU = torch.tensor([0, 5, 11, 16, 22], dtype=torch.int32)  # 2 pairs of irregular lengths


def inputs(hidden_dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(N, H, generator=gen).to(hidden_dtype)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    bias = torch.randn(V, generator=gen) * 0.1
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[[2, 13]] = -100
    return hidden, weight, bias, targets


def run(function, leaves, targets, autocast: bool, **kwargs):
    """function(*leaves, ...) and its gradients; under autocast, backward runs inside the region too."""
    leaves = [t.clone().requires_grad_() for t in leaves]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        value = function(*leaves, targets, **kwargs)
        value.backward()
    return value.detach(), [t.grad for t in leaves]


def linear_logprobs_sum(hidden, weight, bias, targets, **kwargs):
    return rpo_fast.linear_logprobs(hidden, weight, targets, bias, **kwargs).sum()


def fused_loss(hidden, weight, bias, targets, **kwargs):
    return rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, CU, bias=bias, ref_logps=-torch.ones(4) * 20,
                                          **kwargs).loss


@pytest.mark.parametrize("function, kwargs", [
    (linear_logprobs_sum, {}),
    (fused_loss, dict(backward="fwdgrad")),
    (fused_loss, dict(backward="recompute")),
], ids=["linear_logprobs", "fused-fwdgrad", "fused-recompute"])
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16], ids=["fp32-hidden", "bf16-hidden"])
def test_under_autocast_equals_the_inputs_cast_outside_it(function, kwargs, hidden_dtype):
    hidden, weight, bias, targets = inputs(hidden_dtype)
    value, grads = run(function, (hidden, weight, bias), targets, autocast=True, **kwargs)
    cast_leaves = [t.to(torch.bfloat16) for t in (hidden, weight, bias)]
    expected, expected_grads = run(function, cast_leaves, targets, autocast=False, **kwargs)
    torch.testing.assert_close(value, expected, rtol=0, atol=0)
    for grad, like, expected_grad in zip(grads, (hidden, weight, bias), expected_grads):
        assert grad.dtype == like.dtype  # back through the cast, to the leaves' own dtype
        torch.testing.assert_close(grad, expected_grad.to(like.dtype), rtol=0, atol=0)


def test_rpo_loss_module_under_autocast():
    """Liger's interface as a Trainer under bf16 autocast calls it: fp32 head, padded [2B, T, H] inputs."""
    hidden, weight, _, targets = inputs()
    padded, target = hidden[:20].reshape(4, 5, H), targets[:20].reshape(4, 5)
    module = rpo_fast.RPOLoss(use_ref_model=False, compute_nll_loss=True)
    leaves = [t.clone().requires_grad_() for t in (weight, padded)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = module(*leaves, target)
        loss.backward()
    expected, _ = module(weight.bfloat16().requires_grad_(), padded.bfloat16(), target)  # fwdgrad, as above
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=0)
    assert all(torch.isfinite(m).all() for m in metrics)
    assert leaves[0].grad.dtype == torch.float32 and torch.isfinite(leaves[0].grad).all()
