"""Row kernels over a chunk's materialized logits, for gradients formed at forward time.

The forward-time-gradient path has the fp32 logits of a chunk of C tokens at hand ([C, V], from a
cuBLAS GEMM). Two memory-bound passes turn them into what the loss and the gradient GEMMs need:

- `row_logprobs`: per row, the logsumexp (online max/sum over vocab tiles) and the target's log-prob,
  in one read of the logits;
- `logit_grad_`: `dlogits = g[:, None] * (onehot(targets) - exp(logits - lse[:, None]))`, one read and
  one write, in place when the result stays fp32, else into a bf16/fp16 tensor for the GEMMs.

One program per row sweeps the vocabulary in BLOCK_V tiles; row offsets are int64 (C * V passes 2**31
at C = 16384, V = 131072). The loads and stores are 16 bytes wide when V is a multiple of 16, which
the JIT then marks divisible (every vocabulary the project ships a config for is); another V still
runs, element by element.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import RowConfig, check_runnable, default_row_config, on_device

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _row_logprobs_kernel(
    logits_ptr, targets_ptr, lp_ptr, lse_ptr,
    V, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * V
    cols = tl.arange(0, BLOCK_V)
    m = float("-inf")
    sumexp = 0.0
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(row_ptr + v0 + cols, mask=cols < V - v0, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While every logit so far is -inf (a masked head of the vocabulary), m_new is -inf and
        # exp(-inf - -inf) would be NaN: subtract 0 instead (exp(-inf) = 0, sumexp stays 0), as FlashAttention does.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        sumexp = sumexp * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
    lse = m + tl.log(sumexp)
    # Undefined log-softmax, NaN as in the torch pass (row_passes.row_logprobs_to_probs_): all -inf gives
    # -inf + log(0) = -inf here; a +inf or NaN logit already gives NaN.
    lse = tl.where(tl.abs(lse) == float("inf"), float("nan"), lse)
    target = tl.load(targets_ptr + row)
    # An out-of-range target is not read (it would fault); callers validate targets.
    has_target = (target != ignore_index) & (target >= 0) & (target < V)
    target_logit = tl.load(row_ptr + target, mask=has_target, other=0.0)
    tl.store(lse_ptr + row, lse)
    tl.store(lp_ptr + row, tl.where(target != ignore_index, target_logit - lse, 0.0))


@triton.jit
def _logit_grad_kernel(
    logits_ptr, targets_ptr, lse_ptr, g_ptr, out_ptr,
    V, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    offset = row.to(tl.int64) * V
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row)
    g = tl.load(g_ptr + row)
    g = tl.where(target == ignore_index, 0.0, g)
    if g == 0.0:  # the row's gradient is zero: write it without reading the logits
        for v0 in range(0, V, BLOCK_V):
            zeros = tl.zeros((BLOCK_V,), dtype=out_ptr.dtype.element_ty)
            tl.store(out_ptr + offset + v0 + cols, zeros, mask=cols < V - v0)
    else:
        lse = tl.load(lse_ptr + row)
        for v0 in range(0, V, BLOCK_V):
            in_row = cols < V - v0
            x = tl.load(logits_ptr + offset + v0 + cols, mask=in_row, other=0.0)
            onehot = tl.where(v0 + cols == target, 1.0, 0.0)
            dlogits = g * (onehot - tl.exp(x - lse))
            tl.store(out_ptr + offset + v0 + cols, dlogits.to(out_ptr.dtype.element_ty), mask=in_row)


def _check_rows(logits: torch.Tensor, targets: torch.Tensor, **rows: torch.Tensor) -> tuple[int, int]:
    check_runnable(logits, "logits")
    if logits.dim() != 2 or logits.dtype != torch.float32 or not logits.is_contiguous():
        raise ValueError(f"logits: expected a contiguous [C, V] float32 tensor, got {tuple(logits.shape)} "
                         f"{logits.dtype}{'' if logits.is_contiguous() else ' (not contiguous)'}")
    C, V = logits.shape
    if V == 0:  # no log-softmax over an empty vocabulary; the launch would be skipped, leaving lp/lse unwritten
        raise ValueError(f"logits: expected a vocabulary of at least one column [C, V >= 1], got {tuple(logits.shape)}")
    if targets.shape != (C,) or targets.dtype != torch.int64 or targets.device != logits.device:
        raise ValueError(f"targets: expected a [{C}] int64 tensor on {logits.device}, got {tuple(targets.shape)} "
                         f"{targets.dtype} on {targets.device}")
    for name, t in rows.items():
        if t.shape != (C,) or not t.is_floating_point() or t.device != logits.device:
            raise ValueError(f"{name}: expected a [{C}] floating-point tensor on {logits.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    return C, V


def row_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                 config: RowConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row target log-probs and logsumexp of `logits`, in one read.

    Args:
        logits: [C, V >= 1] float32, contiguous. targets: [C] int64 in [0, V), or `ignore_index`, on logits' device.
        config: vocab tile and warps; defaults suit a GPU and the interpreter.

    Returns:
        lp: [C] float32, `logits[n, targets[n]] - logsumexp(logits[n])` (0.0 at ignored targets);
        lse: [C] float32, the logsumexp of every row. Both are NaN (lp: unless ignored) for a row whose
        log-softmax is undefined: every logit -inf, or a +inf or NaN logit. `logit_grad_` still gives such a row
        all zeros where its g is 0 (it does not read the row then).
    """
    C, V = _check_rows(logits, targets)
    cfg = config or default_row_config(logits)
    lp = torch.empty(C, dtype=torch.float32, device=logits.device)
    lse = torch.empty(C, dtype=torch.float32, device=logits.device)
    if C > 0:
        with on_device(logits):
            _row_logprobs_kernel[(C,)](
                logits, targets.contiguous(), lp, lse, V, ignore_index,
                BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
            )
    return lp, lse


def logit_grad_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                out_dtype: torch.dtype = torch.float32, ignore_index: int = -100,
                config: RowConfig | None = None) -> torch.Tensor:
    """`dlogits = g[:, None] * (onehot(targets) - exp(logits - lse[:, None]))`, the gradient of
    `sum_n g[n] * lp[n]` with respect to the logits.

    Args:
        logits: [C, V >= 1] float32, contiguous; overwritten with the result when `out_dtype` is float32.
        targets: [C] int64. lse: [C], the rows' logsumexp (`row_logprobs`). g: [C], dL/dlp per row. All on
            logits' device.
        out_dtype: float32 (in place) or bfloat16/float16 (a new tensor, for the gradient GEMMs).

    Returns:
        dlogits [C, V] of `out_dtype` (`logits` itself for float32). Rows whose target is `ignore_index`
        or whose g is 0 are all zero.
    """
    C, V = _check_rows(logits, targets, lse=lse, g=g)
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype: expected one of {_OUT_DTYPES}, got {out_dtype}")
    cfg = config or default_row_config(logits)
    out = logits if out_dtype == torch.float32 else torch.empty((C, V), dtype=out_dtype, device=logits.device)
    if C > 0:
        with on_device(logits):
            _logit_grad_kernel[(C,)](
                logits, targets.contiguous(), lse.float().contiguous(), g.float().contiguous(), out, V, ignore_index,
                BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
            )
    return out
