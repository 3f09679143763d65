"""Dense reference for the linear -> log-prob op: materializes the full [N, V] logits.

Used by the benchmarks as the naive baseline and, in float64, as their correctness reference (the tests keep
their own float64 formulas, tests/rpo_reference_math.py). Not for
training at scale: at 16384 tokens x 128256 vocab its fp32 logits alone are 8.4 GB.
"""
from __future__ import annotations

import torch


def dense_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`log_softmax(hidden @ weight.T + bias)[targets]` with the logits materialized.

    Args:
        hidden: [N, H]; weight: [V, H]; bias: [V] or None; targets: [N] int64.
        compute_dtype: dtype of the matmul (default: the input dtype, as a model computes it). The
            log-softmax runs in float32, or in float64 when the matmul's dtype (`compute_dtype`, or the
            input's) is float64.

    Returns:
        [N] float32, or float64 when the matmul's dtype is; 0.0 at `ignore_index` targets.
        Differentiable through ordinary autograd.
    """
    dtype = compute_dtype or hidden.dtype
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    softmax_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    logprobs = torch.log_softmax(logits.to(softmax_dtype), dim=-1)
    ignored = targets == ignore_index
    picked = logprobs.gather(1, targets.masked_fill(ignored, 0).unsqueeze(1)).squeeze(1)
    return picked.masked_fill(ignored, 0.0)
