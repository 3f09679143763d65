"""Shared `@triton.jit` helpers for the linear -> log-prob kernels.

Addressing: each program moves scalar int64 base pointers to its block (`row0 * stride`), and keeps
in-block offsets int32. Broadcasting int64 offsets to a whole tile instead costs two registers per
element and spilled every configuration on sm_90.
"""
import triton
import triton.language as tl


@triton.jit
def logit_tile(
    hidden_blk, weight_blk, bias_ptr, v0,
    rows_left, cols_left, H,
    stride_hn, stride_hh, stride_wv, stride_wh,
    HAS_BIAS: tl.constexpr, EVEN_H: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One `[BLOCK_N, BLOCK_V]` fp32 tile of `hidden @ weight.T + bias`.

    `hidden_blk` / `weight_blk` point at the tile's first token / vocab row (vocab index `v0`); rows past
    `rows_left` read zeros and columns past `cols_left` are -inf. Operands go into `tl.dot` in their
    storage dtype (bf16/fp16 on tensor cores) unless `UPCAST`, which only the interpreter needs.
    """
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_H)
    row_in = rows < rows_left
    col_in = cols < cols_left
    h_ptrs = hidden_blk + rows[:, None] * stride_hn + ks[None, :] * stride_hh
    w_ptrs = weight_blk + cols[None, :] * stride_wv + ks[:, None] * stride_wh  # W^T tile [H, V]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        if EVEN_H:
            h = tl.load(h_ptrs, mask=row_in[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_in[None, :], other=0.0)
        else:
            k_in = ks < H - h0
            h = tl.load(h_ptrs, mask=row_in[:, None] & k_in[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=col_in[None, :] & k_in[:, None], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_H * stride_hh
        w_ptrs += BLOCK_H * stride_wh
    if HAS_BIAS:
        acc += tl.load(bias_ptr + v0 + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_in[None, :], acc, float("-inf"))
