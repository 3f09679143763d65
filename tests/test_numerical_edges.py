"""Numerical edges: huge and tiny logits, a vocabulary of one, a rejected response with every token
ignored, extreme beta, label smoothing 0.5. Outputs are finite and equal the float64 reference."""
import pytest
import torch

import rpo_fast
from conftest import assert_close
from rpo_reference_math import assert_within, logprobs64, naive_logprobs, rpo64

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
@pytest.mark.parametrize("beta,label_smoothing,loss_type", [
    (1e3, 0.0, "sigmoid"), (1e-6, 0.0, "sigmoid"), (0.1, 0.5, "sigmoid"), (1e3, 0.0, "hinge"), (1e-3, 0.0, "ipo"),
])
def test_extreme_beta_and_label_smoothing(impl, beta, label_smoothing, loss_type):
    N, H, V = 16, 9, 33
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H)
    targets = torch.randint(0, V, (N,))
    cu = torch.tensor([0, 4, 8, 12, 16], dtype=torch.int32)
    opts = dict(beta=beta, alpha=0.5, sft_norm="sum", loss_type=loss_type, label_smoothing=label_smoothing,
                average_log_prob=False)
    out = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, impl=impl, **opts)
    out.loss.backward()
    h64 = hidden.detach().double().requires_grad_()
    exp = rpo64(logprobs64(h64, weight, None, targets), None, targets, cu, **opts)
    exp["loss"].backward()
    assert torch.isfinite(out.loss) and torch.isfinite(hidden.grad).all()
    assert_close(out.loss, exp["loss"], atol=1e-5, rtol=1e-5, name="loss")
    assert_close(hidden.grad, h64.grad, atol=1e-5 * max(1.0, h64.grad.abs().max().item()), rtol=1e-4, name="d_hidden")
