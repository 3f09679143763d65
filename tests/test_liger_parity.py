"""RPOLoss against Liger's LigerFusedLinearDPOLoss(compute_nll_loss=True, compiled=False) on the same
padded inputs: loss, every auxiliary output, and the gradients of input, weight and bias."""
import inspect

import pytest
import torch

import rpo_fast

liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is the comparison baseline")


def padded_batch(B, T, H, V, dtype, bias):
    x = torch.randn(2 * B, T, H).to(dtype)
    w = (torch.randn(V, H) / H**0.5).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    target = torch.randint(0, V, (2 * B, T))
    prompt_len = torch.randint(0, T - 1, (2 * B,))  # left part of each row is prompt, ignored
    target[torch.arange(T)[None, :] < prompt_len[:, None]] = -100
    return x, w, b, target, torch.randn(2 * B, T, H).to(dtype), (torch.randn(V, H) / H**0.5).to(dtype)


def run(module, x, w, b, target, rx, rw, rb):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    loss, aux = module(leaves[1], leaves[0], target, leaves[2], rx, rw, rb)
    loss.backward()
    return loss, aux, [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("use_ref_model", [False, True], ids=["noref", "ref"])
@pytest.mark.parametrize("average_log_prob", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_matches_liger_fp32(impl, bias, use_ref_model, average_log_prob, loss_type):
    x, w, b, target, rx, rw = padded_batch(B=3, T=11, H=24, V=97, dtype=torch.float32, bias=bias)
    rb = torch.randn(97) if (bias and use_ref_model) else None
    opts = dict(beta=0.2, alpha=0.6, compute_nll_loss=True, use_ref_model=use_ref_model,
                average_log_prob=average_log_prob, loss_type=loss_type)
    ref_args = (rx, rw, rb) if use_ref_model else (None, None, None)
    want = run(liger.LigerFusedLinearDPOLoss(compiled=False, **opts), x, w, b, target, *ref_args)
    got = run(rpo_fast.RPOLoss(impl=impl, **opts), x, w, b, target, *ref_args)

    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    names = ["chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "nll_loss",
             "chosen_rewards", "rejected_rewards"]
    assert len(got[1]) == len(want[1]) == len(names)
    for name, g, e in zip(names, got[1], want[1]):
        torch.testing.assert_close(g.float(), e.float(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for name, g, e in zip(["input", "weight", "bias"], got[2], want[2]):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_matches_liger_bf16(impl):
    x, w, b, target, rx, rw = padded_batch(B=2, T=9, H=32, V=130, dtype=torch.bfloat16, bias=True)
    opts = dict(beta=0.1, alpha=1.0, compute_nll_loss=True)
    want = run(liger.LigerFusedLinearDPOLoss(compiled=False, **opts), x, w, b, target, rx, rw, None)
    got = run(rpo_fast.RPOLoss(impl=impl, **opts), x, w, b, target, rx, rw, None)
    # Liger rounds bf16 logits before the softmax, we accumulate them in fp32: agree to bf16 precision.
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2e-2, atol=2e-2)
    for g, e in zip(got[2], want[2]):
        torch.testing.assert_close(g.float(), e.float(), rtol=5e-2, atol=5e-3)


def test_nll_off_matches_liger_plain_dpo():
    x, w, b, target, rx, rw = padded_batch(B=2, T=6, H=8, V=31, dtype=torch.float32, bias=False)
    want = run(liger.LigerFusedLinearDPOLoss(compiled=False, compute_nll_loss=False), x, w, b, target, rx, rw, None)
    got = run(rpo_fast.RPOLoss(compute_nll_loss=False), x, w, b, target, rx, rw, None)
    torch.testing.assert_close(got[0], want[0])
    assert float(got[1][4]) == 0.0 == float(want[1][4])


def test_takes_every_liger_constructor_keyword():
    """A drop-in: code that passes Liger's constructor keywords (by name, with their defaults) builds an RPOLoss."""
    params = inspect.signature(liger.LigerFusedLinearDPOLoss.__init__).parameters
    defaults = {name: p.default for name, p in params.items() if name != "self"}
    assert defaults and all(v is not inspect.Parameter.empty for v in defaults.values())
    module = rpo_fast.RPOLoss(**defaults)
    liger_module = liger.LigerFusedLinearDPOLoss(**defaults)
    for name in defaults:  # the same attributes, for code that reads them back (loss.beta, loss.discopop_tau, ...)
        if hasattr(liger_module, name):
            assert getattr(module, name) == getattr(liger_module, name), name
