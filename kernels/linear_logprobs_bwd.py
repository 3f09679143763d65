"""Backward kernel: gradients of `lp = log_softmax(hidden @ weight.T + bias)[targets]`.

With `g[n] = dL/dlp[n]`, `dL/dlogits[n, v] = g[n] * (onehot(targets[n])[v] - softmax[n, v])`. Each
program recomputes one [BLOCK_N, BLOCK_V] logit tile from the saved logsumexp, forms that gradient
tile in registers, and adds its contributions to dhidden (= dlogits @ weight), dweight
(= dlogits.T @ hidden) and dbias with fp32 atomics, hidden-tile by hidden-tile. Programs are ordered
in groups of GROUP_N token blocks so that a weight tile is reused from L2. A tile whose rows all have
g = 0 (ignored tokens, masked rows) contributes nothing and returns before its logit GEMM (exact).

The atomics are relaxed (`sem="relaxed"`): nothing in the kernel reads an accumulator back, so no
ordering between them is needed, and the kernel boundary orders them before anyone reads the
gradients. The default (`acq_rel`) puts a GPU-wide fence (`MEMBAR.ALL.GPU`) and an L1 invalidate
around every vector atomic on sm_90; tests/test_aot_compile.py checks the SASS has none.

With FILTER_GRAD (Cut Cross-Entropy's gradient filtering), a tile whose every |onehot - softmax| is
below `filter_eps` skips its atomics: at large vocabularies most tiles hold only probabilities far below
the output dtype's resolution, and the atomics dominate the backward's memory traffic. The bound is per
entry, not on what is dropped: the skipped entries' sum (sum_v p_v w_v in dhidden) can be large when the
softmax is flat (bf16, V = 50257, near-uniform: dhidden 27x the naive bf16 computation's error).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import (
    TileConfig, check_runnable, default_config, grad_filter_eps, head_operands, kernel_flags, on_device,
)
from .tiles import logit_tile


@triton.jit
def _linear_logprobs_bwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, grad_lp_ptr,
    grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr,
    N, V, H, ignore_index, filter_eps,
    stride_hn, stride_hh, stride_wv, stride_wh,
    HAS_BIAS: tl.constexpr, EVEN_H: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, FILTER_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    # Grouped ordering: GROUP_N token blocks sweep the vocabulary together.
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    v_blocks = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * v_blocks
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(n_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows

    n0 = pid_n * BLOCK_N
    v0 = pid_v * BLOCK_V
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_H)
    row_in = rows < N - n0
    col_in = cols < V - v0
    hidden_blk = hidden_ptr + n0.to(tl.int64) * stride_hn
    weight_blk = weight_ptr + v0.to(tl.int64) * stride_wv
    targets = tl.load(targets_ptr + n0 + rows, mask=row_in, other=ignore_index)
    lse = tl.load(lse_ptr + n0 + rows, mask=row_in, other=0.0)
    g = tl.load(grad_lp_ptr + n0 + rows, mask=row_in, other=0.0)
    g = tl.where(targets == ignore_index, 0.0, g)
    if tl.sum((g != 0.0).to(tl.int32)) == 0:  # NaN != 0: a NaN gradient still propagates
        return

    logits = logit_tile(
        hidden_blk, weight_blk, bias_ptr, v0, N - n0, V - v0, H,
        stride_hn, stride_hh, stride_wv, stride_wh,
        HAS_BIAS, EVEN_H, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H,
    )
    probs = tl.exp(logits - lse[:, None])
    onehot = ((v0 + cols)[None, :] == targets[:, None]).to(tl.float32)
    dsoftmax = tl.where((g != 0.0)[:, None], onehot - probs, 0.0)
    if FILTER_GRAD:
        if tl.max(tl.abs(dsoftmax)) < filter_eps:
            return
    dlogits = g[:, None] * dsoftmax  # [BLOCK_N, BLOCK_V] fp32

    if COMPUTE_DB:
        tl.atomic_add(grad_bias_ptr + v0 + cols, tl.sum(dlogits, axis=0), mask=col_in, sem="relaxed")

    if UPCAST:
        dlogits_op = dlogits
    else:
        dlogits_op = dlogits.to(hidden_ptr.dtype.element_ty)
    for h0 in range(0, H, BLOCK_H):
        k = h0 + ks
        k_in = k < H
        if COMPUTE_DH:
            # dhidden[n, h] += sum_v dlogits[n, v] * weight[v, h]; fp32 buffers are contiguous [N, H], [V, H].
            w = tl.load(weight_blk + cols[:, None] * stride_wv + k[None, :] * stride_wh,
                        mask=col_in[:, None] & k_in[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            dh = tl.dot(dlogits_op, w, input_precision=DOT_PRECISION)
            tl.atomic_add(grad_hidden_ptr + n0.to(tl.int64) * H + rows[:, None] * H + k[None, :], dh,
                          mask=row_in[:, None] & k_in[None, :], sem="relaxed")
        if COMPUTE_DW:
            # dweight[v, h] += sum_n dlogits[n, v] * hidden[n, h]
            x = tl.load(hidden_blk + rows[:, None] * stride_hn + k[None, :] * stride_hh,
                        mask=row_in[:, None] & k_in[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
            dw = tl.dot(tl.trans(dlogits_op), x, input_precision=DOT_PRECISION)
            tl.atomic_add(grad_weight_ptr + v0.to(tl.int64) * H + cols[:, None] * H + k[None, :], dw,
                          mask=col_in[:, None] & k_in[None, :], sem="relaxed")


def linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_lp: torch.Tensor,
    ignore_index: int = -100,
    needs_grad: tuple[bool, bool, bool] = (True, True, True),
    config: TileConfig | None = None,
    filter_eps: float | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of `lp` (from `linear_logprobs_fwd`) given `grad_lp = dL/dlp`.

    Args:
        hidden: [N, H], weight: [V, H], bias: [V] or None, all of one dtype (bf16/fp16/fp32).
        targets: [N] int64/int32 in [0, V) or `ignore_index` (the range is the caller's job, as in the forward).
            lse: [N] fp32 from the forward. grad_lp: [N], any float dtype. All on hidden's device.
        needs_grad: which of (hidden, weight, bias) need a gradient.
        filter_eps: skip tiles whose |onehot - softmax| < filter_eps everywhere (an approximation; 0.0 = off).
            None (default): the `RPO_FAST_GRAD_FILTER` environment switch (`launch.grad_filter_eps`; off when unset).

    Returns:
        (grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) in the input dtype, accumulated in
        fp32; None for those not needed.
    """
    check_runnable(hidden)
    hidden, weight, bias, targets = head_operands(hidden, weight, bias, targets)
    if lse.shape != targets.shape or grad_lp.shape != targets.shape:
        raise ValueError(f"lse and grad_lp: expected shape ({targets.shape[0]},), got {tuple(lse.shape)} and "
                         f"{tuple(grad_lp.shape)}")
    for name, t in (("lse", lse), ("grad_lp", grad_lp)):
        if not t.is_floating_point() or t.device != hidden.device:
            raise ValueError(f"{name}: expected a floating-point tensor on {hidden.device} (as hidden), got "
                             f"{t.dtype} on {t.device}")
    (N, H), V = hidden.shape, weight.shape[0]
    want_dh, want_dw, want_db = needs_grad
    want_db = want_db and bias is not None
    cfg = config or default_config(hidden, backward=True)
    if filter_eps is None:
        filter_eps = grad_filter_eps(hidden.dtype)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros((N, H), **f32) if want_dh else None
    grad_weight = torch.zeros((V, H), **f32) if want_dw else None
    grad_bias = torch.zeros((V,), **f32) if want_db else None
    if N > 0 and (want_dh or want_dw or want_db):
        grid = (triton.cdiv(N, cfg.block_n) * triton.cdiv(V, cfg.block_v),)
        with on_device(hidden):
            _linear_logprobs_bwd_kernel[grid](
                hidden, weight, bias, targets, lse.float().contiguous(), grad_lp.float().contiguous(),
                grad_hidden, grad_weight, grad_bias,
                N, V, H, ignore_index, float(filter_eps or 0.0),
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                HAS_BIAS=bias is not None, EVEN_H=H % cfg.block_h == 0, **kernel_flags(hidden),
                COMPUTE_DH=want_dh, COMPUTE_DW=want_dw, COMPUTE_DB=want_db, FILTER_GRAD=bool(filter_eps),
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP_N=cfg.group_n,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
    cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
    return cast(grad_hidden, hidden), cast(grad_weight, weight), cast(grad_bias, bias)
