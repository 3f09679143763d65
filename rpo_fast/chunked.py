"""Chunked pure-PyTorch backend of the linear -> log-prob op.

Processes tokens in chunks so that at most a [chunk, V] block of logits exists at a time; the backward
recomputes each chunk's logits from the saved logsumexp. Peak extra memory is one [chunk, V] fp32 block (8 MiB on CPU, 64 MiB on CUDA) plus the
fp32 weight-gradient accumulator (the weight-gradient products run in fp32, in place). The default on CPU and the fallback where Triton is unavailable.
Same contract as `rpo_fast.kernels.linear_logprobs_fwd` / `linear_logprobs_bwd`.
"""
from __future__ import annotations

import torch

# Elements of one chunk's fp32 logits. CPU: 2**21 x 4 B = 8 MiB (64 tokens at a 32000-token vocab), small
# enough that the chunk stays below an eighth of the dense path's memory at 1024 tokens, with no loss of
# speed (bench/RESULTS.md). CUDA: 64 MiB, so a chunk at a 128k vocab still has 130 rows for the GEMMs.
CHUNK_ELEMENTS = 2**21
CUDA_CHUNK_ELEMENTS = 2**24


def chunk_rows(vocab_size: int, chunk_size: int | None = None, device: torch.device | None = None) -> int:
    """Tokens per chunk: `chunk_size`, or as many as fit the device's logits budget."""
    budget = CUDA_CHUNK_ELEMENTS if device is not None and device.type == "cuda" else CHUNK_ELEMENTS
    return chunk_size or max(1, budget // max(1, vocab_size))


def _chunk_logits(hidden, weight, bias):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits.float()


def chunked_linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns lp [N] fp32 (0.0 at ignored targets) and lse [N] fp32."""
    N, V = hidden.shape[0], weight.shape[0]
    lp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    ignored = targets == ignore_index
    safe_targets = targets.masked_fill(ignored, 0)
    step = chunk_rows(V, chunk_size, hidden.device)
    for start in range(0, N, step):
        rows = slice(start, start + step)
        logits = _chunk_logits(hidden[rows], weight, bias)
        # torch's logsumexp returns +-inf for infinite logits; their log-probs are undefined: NaN, as in
        # the kernels' online softmax.
        chunk_lse = torch.logsumexp(logits, dim=-1)
        lse[rows] = chunk_lse.masked_fill(chunk_lse.isinf(), float("nan"))
        lp[rows] = logits.gather(1, safe_targets[rows, None]).squeeze(1) - lse[rows]
        del logits, chunk_lse  # free this chunk before the next one is computed: one chunk alive, not two
    return lp.masked_fill_(ignored, 0.0), lse


def chunked_linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_lp: torch.Tensor,
    ignore_index: int = -100,
    needs_grad: tuple[bool, bool, bool] = (True, True, True),
    chunk_size: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (hidden, weight, bias) in the input dtype; weight/bias accumulate in fp32."""
    N, V = hidden.shape[0], weight.shape[0]
    want_dh, want_dw, want_db = needs_grad
    want_db = want_db and bias is not None
    ignored = targets == ignore_index
    safe_targets = targets.masked_fill(ignored, 0)
    g = grad_lp.float().masked_fill(ignored, 0.0)
    grad_hidden = torch.empty_like(hidden) if want_dh else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
    grad_bias = torch.zeros(V, dtype=torch.float32, device=weight.device) if want_db else None
    step = chunk_rows(V, chunk_size, hidden.device)
    for start in range(0, N, step):
        rows = slice(start, start + step)
        # dlogits = g * (onehot - softmax), built in place on the recomputed logits.
        dlogits = _chunk_logits(hidden[rows], weight, bias).sub_(lse[rows, None]).exp_().neg_()
        dlogits.scatter_add_(1, safe_targets[rows, None], torch.ones_like(lse[rows, None]))
        dlogits.mul_(g[rows, None])
        if want_db:
            grad_bias += dlogits.sum(0)
        if want_dw:
            # In place in fp32: a native-dtype product plus its fp32 copy would be two [V, H] temporaries.
            grad_weight.addmm_(dlogits.T, hidden[rows].float())
        if want_dh:
            grad_hidden[rows] = dlogits.to(hidden.dtype) @ weight
        del dlogits
    cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
    return grad_hidden, cast(grad_weight, weight), cast(grad_bias, bias)
