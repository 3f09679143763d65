"""`linear_logprobs`: the fused linear -> log-prob op, its autograd Function and backend dispatch.

Both memory-lean backends share one contract: `forward(hidden, weight, bias, targets, ignore_index)
-> (lp [N] fp32, lse [N] fp32)` and `backward(hidden, weight, bias, targets, lse, grad_lp,
ignore_index, needs_grad) -> (dhidden, dweight, dbias)`. The autograd Function saves only the
inputs and `lse`; the [N, V] logits never exist.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from . import checks
from .chunked import chunked_linear_logprobs_bwd, chunked_linear_logprobs_fwd
from .reference import dense_linear_logprobs


class Backend(NamedTuple):
    forward: Callable
    backward: Callable


def _backend(impl: str) -> Backend:
    if impl == "torch":
        return Backend(chunked_linear_logprobs_fwd, chunked_linear_logprobs_bwd)
    from . import kernels  # imported lazily: the CPU path needs no Triton

    return Backend(kernels.linear_logprobs_fwd, kernels.linear_logprobs_bwd)


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int, backend: Backend):
        lp, lse = backend.forward(hidden, weight, bias, targets, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.ignore_index = ignore_index
        ctx.backend = backend
        return lp

    @staticmethod
    def backward(ctx, grad_lp):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        grads = ctx.backend.backward(hidden, weight, bias, targets, lse, grad_lp, ctx.ignore_index,
                                     tuple(ctx.needs_input_grad[:3]))
        return (*grads, None, None, None)


def resolve_impl(impl: str, device: torch.device) -> str:
    checks.check_choice("impl", impl, checks.IMPLS)
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-token log-probs `log_softmax(hidden @ weight.T + bias)[targets]` without the [N, V] logits.

    Args:
        hidden: [N, H] bf16/fp16/fp32 (the backbone's last hidden states at the positions to score).
        weight: [V, H], same dtype (the LM head). bias: [V] or None.
        targets: [N] int64, the next token at each position; `ignore_index` marks unscored positions.
        impl: "triton" (fused kernels), "torch" (chunked PyTorch), "dense" (full logits, reference)
            or "auto" (triton on CUDA, torch on CPU).

    Returns:
        [N] float32, 0.0 where `targets == ignore_index`. Differentiable in hidden, weight and bias.

    Raises:
        ValueError: on shape/dtype/device mismatches, targets outside [0, V), or an unknown impl.
    """
    checks.check_head("", hidden, weight, bias)
    checks.check_targets(targets, hidden.shape[0], weight.shape[0], ignore_index, hidden.device)
    impl = resolve_impl(impl, hidden.device)
    targets = targets.long().contiguous()
    if impl == "dense":
        return dense_linear_logprobs(hidden, weight, targets, bias, ignore_index)
    backend = _backend(impl)
    bias = None if bias is None else bias.contiguous()
    needs_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not needs_graph:  # reference heads and evaluation: nothing is saved
        return backend.forward(hidden, weight, bias, targets, ignore_index)[0]
    return LinearLogprobsFunction.apply(hidden, weight, bias, targets, ignore_index, backend)
