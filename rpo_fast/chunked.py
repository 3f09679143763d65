"""Chunked pure-PyTorch backend of the linear -> log-prob op: the recompute backward.

The forward processes tokens in chunks so that at most a [rows, V] block of fp32 logits exists at a time and
keeps only the per-token logsumexp; the backward recomputes each block's logits from it and forms
`dlogits = g * (onehot - softmax)` in place. Same contract as `rpo_fast.kernels.linear_logprobs_fwd` /
`linear_logprobs_bwd`. The forward that impl="auto" picks on CPU and impl="torch" picks on any device (nothing
falls back to it when Triton is missing), and on CUDA the exact backward for callers whose upstream gradient
arrives only in backward (TRL).

Products (`rpo_fast.gemm`): on CUDA every head GEMM is a bf16/fp16 tensor-core GEMM with fp32
accumulation (no fp32 x fp32 SGEMM): logits come out in fp32, so the log-softmax never sees logits rounded
to bf16 (as in the Triton kernels), and the gradient GEMMs take dlogits cast to the input dtype. The weight
gradient accumulates over chunks in fp32 on every device. fp32 inputs give fp32 products throughout. On CPU,
bf16/fp16 inputs are upcast: the token layout takes one fp32 copy of the weight (4*V*H bytes) for the whole
call (`gemm.gemm_operand`), the vocab layout a copy of each slice, and every product is an fp32 one.

Two backward layouts:
    token chunks  (default) rows of tokens at a time, every chunk against the whole vocabulary; dweight
                  accumulates in an fp32 [V, H] buffer. Chunks are at least `MIN_CUDA_ROWS` rows on CUDA
                  so that the weight is not re-read from HBM for every few rows.
    vocab slices  slices of the vocabulary at a time, every slice against all N tokens: dweight[slice] is
                  written by one GEMM (its sum over tokens is inside the GEMM), dhidden accumulates in an fp32
                  [N, H] buffer instead. For when the fp32 [V, H] buffer does not fit (`choose_layout`).
"""
from __future__ import annotations

import torch

from .gemm import HALF_DTYPES, addmm_f32_, gemm_operand, logits_f32, operand_dtype

# Elements of one chunk's fp32 logits. CPU: 2**21 x 4 B = 8 MiB (65 tokens at a 32000-token vocab), small
# enough that the chunk stays below an eighth of the dense path's memory at 1024 tokens, with no loss of
# speed (bench/RESULTS.md). CUDA: 64 MiB, and never fewer than MIN_CUDA_ROWS rows: a GEMM of 130 rows (the
# budget alone at a 128k vocab) streams the whole weight from HBM for little work; 1024 rows make the logits
# GEMM compute-bound (at V=128256: 0.5 GiB of fp32 logits plus 0.25 GiB of bf16 dlogits).
CHUNK_ELEMENTS = 2**21
CUDA_CHUNK_ELEMENTS = 2**24
MIN_CUDA_ROWS = 1024
# Vocab-slice layout: elements of one [N, slice] fp32 block (CUDA: 256 MiB, 4096 vocab rows at N=16384).
SLICE_ELEMENTS = 2**21
CUDA_SLICE_ELEMENTS = 2**26
# On CUDA the token-chunk layout is used while its fp32 [V, H] dweight buffer takes at most this share of the
# device's free memory; above it the vocab-slice layout, whose fp32 buffer is [N, H].
DW_BUFFER_SHARE = 0.25
LAYOUTS = ("tokens", "vocab")


def chunk_rows(vocab_size: int, chunk_size: int | None = None, device: torch.device | None = None) -> int:
    """Tokens per chunk: `chunk_size`, or as many as fit the device's logits budget (at least
    `MIN_CUDA_ROWS` on CUDA)."""
    if chunk_size:
        return chunk_size
    if device is not None and device.type == "cuda":
        return max(MIN_CUDA_ROWS, CUDA_CHUNK_ELEMENTS // max(1, vocab_size))
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def slice_rows(n_tokens: int, slice_size: int | None = None, device: torch.device | None = None) -> int:
    """Vocabulary rows per slice of the vocab-slice layout: `slice_size`, or as many as fit the budget."""
    if slice_size:
        return slice_size
    budget = CUDA_SLICE_ELEMENTS if device is not None and device.type == "cuda" else SLICE_ELEMENTS
    return max(1, budget // max(1, n_tokens))


def choose_layout(n_tokens: int, vocab_size: int, hidden_size: int, want_dw: bool, device: torch.device) -> str:
    """"tokens" unless an fp32 [V, H] weight-gradient buffer would crowd a CUDA device (more than
    `DW_BUFFER_SHARE` of its free memory) while the vocab-slice layout's fp32 [N, H] buffer is smaller."""
    if device.type != "cuda" or not want_dw or n_tokens >= vocab_size:
        return "tokens"
    free, _ = torch.cuda.mem_get_info(device)
    return "vocab" if 4 * vocab_size * hidden_size > DW_BUFFER_SHARE * free else "tokens"


def chunked_linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of `targets` under `log_softmax(hidden @ weight.T + bias)`, `chunk_rows` tokens at a time.

    Args:
        hidden: [N, H] bf16/fp16/fp32. weight: [V, H], same dtype. bias: [V] or None (not checked here).
        targets: [N] int64; `ignore_index` marks tokens whose log-prob is reported as 0.
        chunk_size: tokens per chunk (None: `chunk_rows`' budget for the device).

    Returns:
        lp: [N] fp32 (0.0 at ignored targets) and lse: [N] fp32 (NaN where a row's logsumexp would be infinite).
    """
    N, V = hidden.shape[0], weight.shape[0]
    lp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    ignored = targets == ignore_index
    safe_targets = targets.masked_fill(ignored, 0)
    w_op = gemm_operand(weight)
    step = chunk_rows(V, chunk_size, hidden.device)
    for start in range(0, N, step):
        rows = slice(start, start + step)
        logits = logits_f32(hidden[rows].to(w_op.dtype), w_op, bias)
        # torch's logsumexp returns +-inf for infinite logits; their log-probs are undefined: NaN, as in
        # the kernels' online softmax.
        chunk_lse = torch.logsumexp(logits, dim=-1)
        lse[rows] = chunk_lse.masked_fill(chunk_lse.isinf(), float("nan"))
        lp[rows] = logits.gather(1, safe_targets[rows, None]).squeeze(1) - lse[rows]
        del logits, chunk_lse  # free this chunk before the next one is computed: one chunk alive, not two
    return lp.masked_fill_(ignored, 0.0), lse


def _dlogits(probs: torch.Tensor, cols: torch.Tensor, hits: torch.Tensor | None, neg_g: torch.Tensor,
             dead: torch.Tensor | None, grad_bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """`g * (onehot - softmax)` from the softmax block `probs` [rows, V'] fp32, overwritten.

    cols [rows] are the target columns inside the block, `hits` [rows] bool where the target lies in it
    (None: everywhere); neg_g [rows] is -g. `dead` [rows] bool (None: no such row) marks rows with g == 0 whose
    logsumexp is undefined: their softmax is NaN and 0 * NaN is NaN, so they are zeroed here, before a NaN could
    reach every element of the weight gradient through the GEMM. grad_bias [V'] fp32 accumulates the block's
    column sums. Returns dlogits in `out_dtype`: a new half-precision block (the GEMM operand on CUDA), or
    `probs` itself for fp32.
    """
    if dead is not None:
        probs.masked_fill_(dead[:, None], 0.0)
    minus_one = torch.full_like(neg_g[:, None], -1.0)
    if hits is not None:
        minus_one.masked_fill_(~hits[:, None], 0.0)
    probs.scatter_add_(1, cols[:, None], minus_one)  # softmax - onehot (only the rows' target entries)
    if grad_bias is not None:
        grad_bias.addmv_(probs.T, neg_g)  # reads the block once; no [rows, V'] temporary
    if out_dtype in HALF_DTYPES:  # multiply and cast in one pass
        return torch.mul(probs, neg_g[:, None], out=torch.empty_like(probs, dtype=out_dtype))
    return probs.mul_(neg_g[:, None])


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
    layout: str = "auto",
    slice_size: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of `lp` (from either backend's forward) given `grad_lp = dL/dlp`, logits recomputed.

    Args:
        hidden: [N, H] bf16/fp16/fp32. weight: [V, H], same dtype. bias: [V] or None (not checked here).
        targets: [N] int64. lse: [N] fp32 saved by the forward. grad_lp: [N], any float dtype.
        needs_grad: which of (hidden, weight, bias) need a gradient.
        layout: "tokens", "vocab" or "auto" (`choose_layout`); chunk_size / slice_size override the token rows
            per chunk / vocab rows per slice of the two layouts.

    Returns:
        (grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) in the dtypes of hidden, weight and bias, contiguous
        whatever the inputs' strides (what the op's fake implementation reports to torch.compile); sums over
        chunks / slices accumulate in fp32. None for those not needed (grad_bias also when bias is None).
    """
    if layout not in ("auto", *LAYOUTS):
        raise ValueError(f"layout: expected 'auto', 'tokens' or 'vocab', got {layout!r}")
    N, H, V = hidden.shape[0], hidden.shape[1], weight.shape[0]
    want_dh, want_dw, want_db = needs_grad
    want_db = want_db and bias is not None
    if layout == "auto":
        layout = choose_layout(N, V, H, want_dw, hidden.device)
    ignored = targets == ignore_index
    safe_targets = targets.masked_fill(ignored, 0)
    neg_g = grad_lp.float().masked_fill(ignored, 0.0).neg_()
    dead = (neg_g == 0) & ~lse.isfinite()  # checked once here, so that the loops below do not sync per chunk
    dead = dead if bool(dead.any()) else None
    # dlogits in the input dtype where the GEMMs take halves with fp32 accumulation (CUDA), else fp32; the
    # other operand of each gradient GEMM is cast to match (no-op on CUDA and in fp32).
    d_dtype = operand_dtype(weight)
    grad_bias = torch.zeros(V, dtype=torch.float32, device=weight.device) if want_db else None
    cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731

    # Elementwise passes over each [rows, V'] block, besides the logits GEMM that writes it and the two
    # gradient GEMMs that read the dlogits: 3 read+write passes (- lse, exp, x -g, the last one writing the
    # half-precision dlogits on CUDA; in place in fp32), plus with a bias 1 read+write (+ bias) and 1 read (its
    # gradient, a GEMV). The one-hot term is a scatter of one element per row.
    if layout == "tokens":
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if want_dh else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
        w_op = gemm_operand(weight)
        step = chunk_rows(V, chunk_size, hidden.device)
        for start in range(0, N, step):
            rows = slice(start, start + step)
            h = hidden[rows].to(w_op.dtype)  # cast once for the logits and dweight (a no-op but on CPU halves)
            probs = logits_f32(h, w_op, bias).sub_(lse[rows, None]).exp_()
            dlogits = _dlogits(probs, safe_targets[rows], None, neg_g[rows], None if dead is None else dead[rows],
                               grad_bias, d_dtype)
            del probs
            if want_dw:
                addmm_f32_(grad_weight, dlogits.T, h)
            if want_dh:  # dlogits is in w_op's dtype: halves on CUDA, fp32 elsewhere
                grad_hidden[rows] = dlogits @ w_op
            del dlogits
        return grad_hidden, cast(grad_weight, weight), cast(grad_bias, bias)

    # Vocab slices: dweight[slice] in one GEMM over all N tokens, dhidden summed over slices in fp32.
    grad_hidden32 = torch.zeros(N, H, dtype=torch.float32, device=hidden.device) if want_dh else None
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if want_dw else None
    h_op = hidden.to(d_dtype)  # all N rows enter every slice's dweight GEMM: cast once (no-op but on CPU halves)
    step = slice_rows(N, slice_size, hidden.device)
    for start in range(0, V, step):
        cols = slice(start, start + step)
        w_rows = weight[cols]
        probs = logits_f32(hidden, w_rows, None if bias is None else bias[cols]).sub_(lse[:, None]).exp_()
        local = safe_targets - start
        hits = (local >= 0) & (local < w_rows.shape[0])
        db = None if grad_bias is None else grad_bias[cols]
        dlogits = _dlogits(probs, local.clamp_(0, w_rows.shape[0] - 1), hits, neg_g, dead, db, d_dtype)
        del probs
        if want_dw:
            grad_weight[cols] = dlogits.T @ h_op  # the sum over tokens inside one GEMM (fp32 accumulation)
        if want_dh:
            addmm_f32_(grad_hidden32, dlogits, w_rows.to(d_dtype))
        del dlogits
    return cast(grad_hidden32, hidden), grad_weight, cast(grad_bias, bias)
