"""Triton kernels for the fused linear -> log-prob op (no autograd, no torch.nn).

Installed as `rpo_fast.kernels`. `linear_logprobs_fwd` returns per-token log-probs and the logsumexp;
`linear_logprobs_bwd` recomputes logits tile by tile to produce the input gradients. `row_logprobs` and
`logit_grad_` work on a chunk's materialized fp32 logits (the forward-time-gradient path): per-row
log-probs and logsumexp, then the logits' gradient in place or in bf16/fp16.
"""
from .launch import RowConfig, TileConfig
from .linear_logprobs_bwd import linear_logprobs_bwd
from .linear_logprobs_fwd import linear_logprobs_fwd
from .logit_grad import logit_grad_, row_logprobs

__all__ = ["RowConfig", "TileConfig", "linear_logprobs_fwd", "linear_logprobs_bwd", "row_logprobs", "logit_grad_"]
