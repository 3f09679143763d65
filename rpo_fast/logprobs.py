"""`linear_logprobs`: the fused linear -> log-prob head as a PyTorch custom op, its autograd formula, backend dispatch.

Both memory-lean backends share one contract: `forward(hidden, weight, bias, targets, ignore_index)
-> (lp [N] fp32, lse [N] fp32)` and `backward(hidden, weight, bias, targets, lse, grad_lp,
ignore_index, needs_grad) -> (dhidden, dweight, dbias)`. The autograd formula saves only the
inputs and `lse`; the [N, V] logits never exist.

The op's `impl` picks the forward ("triton": the fused kernel, "torch": chunked PyTorch) and its
`backward` the gradient ("recompute": chunked PyTorch that recomputes each chunk's logits from the saved
logsumexp, on tensor-core GEMMs on CUDA; "atomic": the Triton kernel that scatters dhidden / dweight with
fp32 atomics). Any forward pairs with any backward: both recompute from the same saved `lse`.

Both are registered as PyTorch custom ops, `torch.ops.rpo_fast.linear_logprobs_fwd` / `_bwd`, with fake
(meta) implementations and the autograd formula: `torch.compile` treats the fused head as one opaque op
(it never traces the Triton launches or the chunk loop), and a compiled graph can hold it whole.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from . import checks
from .autocast import outside_autocast
from .chunked import chunked_linear_logprobs_bwd, chunked_linear_logprobs_fwd
from .reference import dense_linear_logprobs


class Backend(NamedTuple):
    """The forward and backward functions of one memory-lean backend (module docstring's contract): the chunked
    PyTorch ones (`rpo_fast.chunked`) or the Triton kernels (`rpo_fast.kernels`)."""

    forward: Callable
    backward: Callable


def _backend(impl: str) -> Backend:
    if impl == "torch":
        return Backend(chunked_linear_logprobs_fwd, chunked_linear_logprobs_bwd)
    from . import kernels  # imported lazily: the CPU path needs no Triton

    return Backend(kernels.linear_logprobs_fwd, kernels.linear_logprobs_bwd)


def _forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
             ignore_index: int, impl: str, backward: str = "recompute",
             targets_checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(lp [N] fp32, lse [N] fp32) with the backend `impl` ("triton" or "torch").
    `backward` ("recompute" or "atomic") only tells the autograd formula which backward to run. Runs with
    autocast off, in the inputs' dtypes (`rpo_fast.autocast`). `targets_checked`: the caller
    (`unchecked_linear_logprobs`) has checked the targets, which the op would check again (a host sync)."""
    if not targets_checked:  # the op may be called without linear_logprobs
        checks.check_op_targets(hidden, weight, targets, ignore_index)
    with torch.autocast(hidden.device.type, enabled=False):
        return _backend(impl).forward(hidden, weight, bias, targets, ignore_index)


def _backward_grads(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                    lse: torch.Tensor, grad_lp: torch.Tensor, ignore_index: int, impl: str,
                    needs_grad: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden, dweight, dbias) in the input dtypes; a gradient not in `needs_grad` is an empty tensor. Runs with
    autocast off (a CPU backward runs in the caller's thread: under its autocast if `.backward()` is called in one)."""
    with torch.autocast(hidden.device.type, enabled=False):
        grads = _backend(impl).backward(hidden, weight, bias, targets, lse, grad_lp, ignore_index,
                                        tuple(needs_grad))
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


linear_logprobs_fwd = torch.library.custom_op("rpo_fast::linear_logprobs_fwd", _forward, mutates_args=())
linear_logprobs_bwd = torch.library.custom_op("rpo_fast::linear_logprobs_bwd", _backward_grads, mutates_args=())
_PYTHON_IMPLEMENTATIONS = {torch.ops.rpo_fast.linear_logprobs_fwd.default: _forward,
                           torch.ops.rpo_fast.linear_logprobs_bwd.default: _backward_grads}


def python_implementation(op) -> Callable | None:
    """The Python function behind one of rpo_fast's custom ops (an OpOverload), or None for any other op.

    A `TorchDispatchMode` sees a custom op as one call and none of the tensors allocated inside it; the
    memory tools (`live_memory.LiveTensorTracker`, the tests' recorders) run this function under the mode
    instead, so the op's temporaries are counted like any other.
    """
    return _PYTHON_IMPLEMENTATIONS.get(op)


@linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, targets, ignore_index, impl, backward="recompute", targets_checked=False):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@linear_logprobs_bwd.register_fake
def _(hidden, weight, bias, targets, lse, grad_lp, ignore_index, impl, needs_grad):
    like = (hidden, weight, bias if bias is not None and needs_grad[2] else None)
    return tuple(t.new_empty(t.shape) if t is not None and need else hidden.new_empty(0)
                 for t, need in zip(like, needs_grad))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, impl, backward, targets_checked = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])
    ctx.ignore_index = ignore_index
    ctx.backward_impl = "triton" if backward == "atomic" else "torch"


def _backward(ctx, grad_lp, grad_lse):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = linear_logprobs_bwd(hidden, weight, bias, targets, lse, grad_lp.contiguous(), ctx.ignore_index,
                                ctx.backward_impl, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None, None)


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def resolve_impl(impl: str, device: torch.device) -> str:
    """`impl` after checking it is one of `checks.IMPLS`: "auto" is "triton" on CUDA and "torch" on any other
    device; "triton", "torch" and "dense" are returned as given."""
    checks.check_choice("impl", impl, checks.IMPLS)
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


def resolve_op_backward(backward: str) -> str:
    """"recompute" or "atomic". "auto" is "recompute" everywhere: on a GPU the recompute backward runs three
    tensor-core GEMMs per chunk (predicted ~1.7x the GEMM floor at Llama-3-8B), while the atomic kernel pays
    for fp32 atomics into dhidden / dweight (~3.4x even with relaxed atomics); on CPU only recompute is a
    performance path. It is also deterministic, which the atomic kernel is not."""
    checks.check_choice("backward", backward, checks.OP_BACKWARDS)
    return "recompute" if backward == "auto" else backward


def check_kernels_runnable(impl: str, backward: str, hidden: torch.Tensor) -> None:
    """Refuses, in forward, a resolved `impl="triton"` or `backward="atomic"` where Triton cannot run (CPU
    tensors without TRITON_INTERPRET=1): the atomic backward would otherwise fail only in `.backward()`.
    impl="dense" launches no kernel, whatever `backward` says (autograd through the full logits)."""
    if impl == "dense":
        return
    for option, value, triton_value in (("impl", impl, "triton"), ("backward", backward, "atomic")):
        if value == triton_value:
            from . import kernels

            kernels.launch.check_runnable(hidden, choice=f"{option}={value!r}")


@outside_autocast("hidden", "weight", "bias")
def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    impl: str = "auto",
    backward: str = "auto",
) -> torch.Tensor:
    """Per-token log-probs `log_softmax(hidden @ weight.T + bias)[targets]` without the [N, V] logits.

    Args:
        hidden: [N, H] bf16/fp16/fp32 (the backbone's last hidden states at the positions to score).
        weight: [V, H], same dtype (the LM head). bias: [V] or None.
        targets: [N] int64, the next token at each position; `ignore_index` marks unscored positions.
        impl: "triton" (fused kernels), "torch" (chunked PyTorch), "dense" (full logits, reference)
            or "auto" (triton on CUDA, torch on CPU): the forward.
        backward: "recompute" (chunked, logits recomputed from the saved logsumexp; GEMMs on tensor cores on
            CUDA; deterministic), "atomic" (the Triton kernel with fp32 atomics: a GPU, or the CPU under
            TRITON_INTERPRET=1; not deterministic) or "auto" (= "recompute", see `resolve_op_backward`).
            Ignored by impl="dense" (autograd through the full logits).

    Under `torch.autocast`, hidden, weight and bias are first cast to autocast's dtype, as a `Linear`'s inputs
    would be; the head then runs with autocast off (`rpo_fast.autocast`).

    Under `torch.compile` it traces into one graph (`fullgraph=True` works): the targets' values, which eager
    checks here, are checked by the op when the graph runs (same ValueError). impl="dense" has no op: its
    check reads the targets back here, a graph break (`fullgraph=True` fails).

    Returns:
        [N] float32, 0.0 where `targets == ignore_index`. Differentiable in hidden, weight and bias.

    Raises:
        ValueError: on shape/dtype/device mismatches, targets outside [0, V), an unknown impl or backward, or
            impl="triton" / backward="atomic" on CPU tensors without TRITON_INTERPRET=1 (raised in forward).
    """
    checks.check_head("", hidden, weight, bias)
    impl = resolve_impl(impl, hidden.device)
    # Traced by torch.compile, the targets' values are left to the op, whose implementation is opaque to the
    # trace and checks them when the graph runs (a host read here would break the graph). impl="dense" has no op.
    op_checks = torch.compiler.is_compiling() and impl != "dense"
    checks.check_targets(targets, hidden.shape[0], weight.shape[0], ignore_index, hidden.device, values=not op_checks)
    backward = resolve_op_backward(backward)
    check_kernels_runnable(impl, backward, hidden)
    return unchecked_linear_logprobs(hidden, weight, targets, bias, ignore_index, impl, backward,
                                     targets_checked=not op_checks)


def unchecked_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              bias: torch.Tensor | None, ignore_index: int, impl: str, backward: str,
                              targets_checked: bool = True) -> torch.Tensor:
    """`linear_logprobs` after its checks, for a caller that has made them (`fused_linear_rpo_loss`): `impl` and
    `backward` resolved, the targets checked (the op does not read them back again, unless `targets_checked` is
    False), autocast off."""
    targets = targets.long().contiguous()
    if impl == "dense":
        return dense_linear_logprobs(hidden, weight, targets, bias, ignore_index)
    bias = None if bias is None else bias.contiguous()
    return linear_logprobs_fwd(hidden, weight, bias, targets, ignore_index, impl, backward, targets_checked)[0]
