"""The per-row passes over one chunk's fp32 logits in the forward-time-gradient head (`rpo_fast.fwdgrad`).

Two passes per chunk: the log-softmax at the targets (log-probs and logsumexps), then, once the loss's
derivative `g` of each row is known, `dlogits = g * (onehot - softmax)`. They come in two implementations
with one shape of call but different contents of the logits buffer between them (`RowPasses`):

- the torch passes here (CPU, or impl="torch" on CUDA): `row_logprobs_to_probs_` overwrites the logits with
  the softmax probabilities, each element exponentiated once for both passes (the exp is most of their cost
  on a CPU), and `logit_grad_from_probs_` reads those probabilities;
- the Triton kernels of `kernels.logit_grad` (CUDA, impl "triton"): `row_logprobs` leaves the logits as they
  are, and `logit_grad_` reads the logits (memory-bound: a second exp is free, a second write is not).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from . import host_sync

# Rows per block of the torch passes: a [rows, V] fp32 block of about 1 MiB stays in the CPU's cache through
# the passes over it, and no pass allocates a temporary as large as the chunk (torch.logsumexp would).
BLOCK_ELEMENTS = 2**18


def _row_blocks(logits: torch.Tensor) -> list[slice]:
    rows = max(1, BLOCK_ELEMENTS // max(1, logits.shape[1]))
    return [slice(a, a + rows) for a in range(0, logits.shape[0], rows)]


def row_logprobs_to_probs_(logits: torch.Tensor, targets: torch.Tensor,
                           ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lp [C] fp32, 0.0 at ignored targets; lse [C] fp32) of fp32 logits [C, V] and int64 targets [C].

    Overwrites `logits` with the softmax probabilities `exp(logits - lse)`, which is what
    `logit_grad_from_probs_` reads. A row with a +inf logit, or with no finite logit, has an undefined
    log-softmax: its lse is NaN, as in the fused kernels (-inf logits among finite ones, e.g. a vocabulary
    masked by a -inf bias, are fine: probability 0)."""
    ignored = targets == ignore_index
    target_logit = logits.gather(1, targets.masked_fill(ignored, 0)[:, None]).squeeze(1)
    row_max = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    row_sum = torch.empty_like(row_max)
    for rows in _row_blocks(logits):  # max, exp and sum while the block is in cache
        block = logits[rows]
        torch.amax(block, dim=1, out=row_max[rows])
        block.sub_(row_max[rows, None]).exp_()
        torch.sum(block, dim=1, out=row_sum[rows])
        block.div_(row_sum[rows, None])
    lse = row_max + row_sum.log()
    lse.masked_fill_(lse.isinf(), float("nan"))
    return (target_logit - lse).masked_fill_(ignored, 0.0), lse


def logit_grad_from_probs_(probs: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                           out_dtype: torch.dtype, ignore_index: int = -100) -> torch.Tensor:
    """dlogits [C, V] = g[:, None] * (onehot(targets) - probs), from the fp32 probabilities [C, V] that
    `row_logprobs_to_probs_` (or `softmax_from_lse_`) left in the logits buffer (`lse` [C]: their logsumexps,
    NaN where undefined).

    Rows whose target is `ignore_index` or whose g == 0 are all zero (the contract of `kernels.logit_grad_`,
    which reads the logits themselves). In place when `out_dtype` is float32; else cast to `out_dtype`."""
    counted = targets != ignore_index
    g = g.float().masked_fill(~counted, 0.0)
    for rows in _row_blocks(probs):
        probs[rows].mul_(-g[rows, None])
    probs.scatter_add_(1, targets.masked_fill(~counted, 0)[:, None], g[:, None])  # + g * onehot
    # 0 * NaN is NaN: a row whose logsumexp is undefined but whose gradient weight is 0 must still be 0.
    dead = (g == 0) & ~lse.isfinite()
    if host_sync.waits_for_host_reads(probs.device):  # a fill, not a host read of dead.any() per piece
        probs.masked_fill_(dead[:, None], 0.0)
    elif bool(dead.any()):  # CPU: a read costs nothing, a pass over [C, V] does
        probs[dead] = 0.0
    return probs if out_dtype == torch.float32 else probs.to(out_dtype)


def softmax_from_lse_(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Overwrites fp32 logits [C, V] with `exp(logits - lse)`, the probabilities `row_logprobs_to_probs_`
    leaves, from logsumexps [C] it already computed (a recomputed piece of a long pair): one exp, no max or sum."""
    for rows in _row_blocks(logits):
        logits[rows].sub_(lse[rows, None]).exp_()
    return logits


def _logits_stay(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    return logits


class RowPasses(NamedTuple):
    """The passes over a chunk's logits buffer: `row_logprobs(buffer, ...)` then `logit_grad_(buffer, ...)`, or,
    for logits computed again once their logsumexps are known, `reload_(buffer, lse)` then `logit_grad_`. What
    the buffer holds before `logit_grad_` is theirs (module docstring): the probabilities for the torch passes,
    the logits for the Triton kernels (so their `reload_` does nothing)."""

    row_logprobs: Callable
    logit_grad_: Callable
    reload_: Callable


def row_passes(use_kernels: bool) -> RowPasses:
    """The torch passes of this module, or with `use_kernels` (CUDA tensors) the Triton kernels of
    `kernels.logit_grad`, whose `reload_` leaves the recomputed logits as they are."""
    if not use_kernels:
        return RowPasses(row_logprobs_to_probs_, logit_grad_from_probs_, softmax_from_lse_)
    from .kernels import logit_grad as kernels  # imported lazily: the CPU path needs no Triton

    return RowPasses(kernels.row_logprobs, kernels.logit_grad_, _logits_stay)
