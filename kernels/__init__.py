"""Triton kernels for the fused linear -> log-prob op (no autograd, no torch.nn).

Installed as `rpo_fast.kernels`. `linear_logprobs_fwd` returns per-token log-probs and the logsumexp;
`linear_logprobs_bwd` recomputes logits tile by tile to produce the input gradients.
"""
from .launch import TileConfig
from .linear_logprobs_bwd import linear_logprobs_bwd
from .linear_logprobs_fwd import linear_logprobs_fwd

__all__ = ["TileConfig", "linear_logprobs_fwd", "linear_logprobs_bwd"]
