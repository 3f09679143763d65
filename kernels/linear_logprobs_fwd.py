"""Forward kernel: `lp[n] = (hidden @ weight.T + bias)[n, targets[n]] - logsumexp_v(...)`.

Each program owns BLOCK_N tokens and one contiguous slice of the vocabulary, runs an online
logsumexp over its vocab tiles and picks up the target logit when it passes by. Splitting the
vocabulary keeps the GPU full when there are few tokens; the per-split partial results are O(N)
and are merged by the launcher. The [N, V] logits never leave registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import (
    TileConfig, check_runnable, default_config, head_operands, kernel_flags, num_programs_wanted, on_device,
)
from .tiles import logit_tile


@triton.jit
def _linear_logprobs_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_part_ptr, tgt_part_ptr,
    N, V, H, tiles_per_split,
    stride_hn, stride_hh, stride_wv, stride_wh,
    HAS_BIAS: tl.constexpr, EVEN_H: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_split = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    rows = tl.arange(0, BLOCK_N)
    row_in = rows < N - n0
    hidden_blk = hidden_ptr + n0.to(tl.int64) * stride_hn
    targets = tl.load(targets_ptr + n0 + rows, mask=row_in, other=-1)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sumexp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = pid_split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    weight_blk = weight_ptr + v_begin.to(tl.int64) * stride_wv
    for v0 in range(v_begin, v_end, BLOCK_V):
        logits = logit_tile(
            hidden_blk, weight_blk, bias_ptr, v0,
            N - n0, V - v0, H, stride_hn, stride_hh, stride_wv, stride_wh,
            HAS_BIAS, EVEN_H, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H,
        )
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        # A row whose logits so far are all -inf (e.g. a -inf bias masking the start of this split) has
        # m_new = -inf and exp(-inf - -inf) = NaN: subtract 0 there instead (FlashAttention's guard).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        sumexp = sumexp * tl.exp(m - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
        m = m_new
        is_target = (v0 + tl.arange(0, BLOCK_V))[None, :] == targets[:, None]
        target_logit += tl.sum(tl.where(is_target, logits, 0.0), axis=1)
        weight_blk += BLOCK_V * stride_wv

    out = pid_split.to(tl.int64) * N + n0 + rows
    # A split whose logits are all -inf stores -inf + log(0) = -inf: its exact share of the logsumexp, which
    # the launcher's merge adds as 0.
    tl.store(lse_part_ptr + out, m + tl.log(sumexp), mask=row_in)
    tl.store(tgt_part_ptr + out, target_logit, mask=row_in)


def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int = -100,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of `targets` under `log_softmax(hidden @ weight.T + bias)`.

    Args:
        hidden: [N, H] bf16/fp16/fp32. weight: [V, H], same dtype. bias: [V] or None.
        targets: [N] int64/int32 on hidden's device, in [0, V) or `ignore_index` (tokens whose log-prob is
            reported as 0). The range is the caller's job, not checked here (`launch.head_operands`).
        config: block sizes; defaults suit Hopper on CUDA and the interpreter on CPU.

    Returns:
        lp: [N] fp32 (0.0 at ignored tokens) and lse: [N] fp32, the logsumexp the backward needs.
    """
    check_runnable(hidden)
    hidden, weight, bias, targets = head_operands(hidden, weight, bias, targets)
    (N, H), V = hidden.shape, weight.shape[0]
    cfg = config or default_config(hidden, backward=False)
    n_blocks = triton.cdiv(N, cfg.block_n)
    v_tiles = triton.cdiv(V, cfg.block_v)
    # max(1, n_blocks): no token blocks (N = 0) launches nothing below, but the split count must not divide by 0.
    splits = max(1, min(v_tiles, triton.cdiv(num_programs_wanted(hidden.device), max(1, n_blocks))))
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)  # no empty split

    lse_part = torch.empty((splits, N), dtype=torch.float32, device=hidden.device)
    tgt_part = torch.empty((splits, N), dtype=torch.float32, device=hidden.device)
    if N > 0:
        with on_device(hidden):
            _linear_logprobs_fwd_kernel[(n_blocks, splits)](
                hidden, weight, bias, targets, lse_part, tgt_part,
                N, V, H, tiles_per_split,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                HAS_BIAS=bias is not None, EVEN_H=H % cfg.block_h == 0, **kernel_flags(hidden),
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
    lse = torch.logsumexp(lse_part, dim=0) if splits > 1 else lse_part[0]
    # A row whose logits are all -inf has lse -inf; a +inf or NaN logit gives NaN. The log-softmax is undefined
    # either way: NaN, as in the torch path (chunked.chunked_linear_logprobs_fwd).
    lse = lse.masked_fill(lse.isinf(), float("nan"))
    lp = torch.where(targets == ignore_index, 0.0, tgt_part.sum(0) - lse)
    return lp, lse
