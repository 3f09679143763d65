"""Input validation for the public API. Every user error is a `ValueError` that names the argument, what
was expected and what came."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOSS_TYPES = ("sigmoid", "hinge", "ipo")
SFT_NORMS = ("sum", "seq_mean", "token_mean")
IMPLS = ("auto", "triton", "torch", "dense")
HEAD_BACKWARDS = ("auto", "fwdgrad", "recompute", "atomic")  # fused_linear_rpo_loss(backward=)
OP_BACKWARDS = ("auto", "recompute", "atomic")  # linear_logprobs(backward=)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def _shape(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def check_head(prefix: str, hidden, weight, bias, n_rows: int | None = None) -> None:
    """hidden [N, H] and weight [V, H] of one float dtype and device; bias [V] of that dtype or None."""
    for name, t in ((f"{prefix}hidden", hidden), (f"{prefix}weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a 2-D tensor, got {got}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"{prefix}weight: expected dtype {hidden.dtype} on {hidden.device} like "
                         f"{prefix}hidden, got {_shape(weight)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{prefix}weight: expected a vocabulary of at least one row [V >= 1, H], got "
                         f"{list(weight.shape)}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{prefix}weight: expected shape [V, {hidden.shape[1]}] to match {prefix}hidden "
                         f"[N, H]={list(hidden.shape)}, got {list(weight.shape)}")
    if n_rows is not None and hidden.shape[0] != n_rows:
        raise ValueError(f"{prefix}hidden: expected {n_rows} rows (one per target), got {hidden.shape[0]}")
    if bias is not None:
        if (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)
                or bias.dtype != hidden.dtype or bias.device != hidden.device):
            got = _shape(bias) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"{prefix}bias: expected shape ({weight.shape[0]},) {hidden.dtype} on "
                             f"{hidden.device}, got {got}")


def check_targets(targets, n_rows: int, vocab: int, ignore_index: int, device, *, values: bool = True) -> None:
    """targets [n_rows] (`check_target_values`); with `values=False` their values are left to the caller, which
    reads them back together with something else (one host sync: `bad_targets`, `bad_target_error`)."""
    if not isinstance(targets, torch.Tensor) or targets.shape != (n_rows,):
        got = _shape(targets) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets: expected shape ({n_rows},) (one per hidden row), got {got}")
    if values:
        check_target_values("targets", targets, vocab, ignore_index, device)
    else:
        check_target_dtype("targets", targets, device)


def check_target_values(name: str, targets: torch.Tensor, vocab: int, ignore_index: int, device) -> None:
    """`targets` of any shape: int32 or int64 on `device`, every entry in [0, vocab) or `ignore_index`. The
    message names `name` and the first bad entry's position (an index; [row, column] in a 2-D tensor)."""
    check_target_dtype(name, targets, device)
    bad = bad_targets(targets, vocab, ignore_index)
    if bool(bad.any()):
        raise bad_target_error(name, targets, bad, vocab, ignore_index)


def check_target_dtype(name: str, targets: torch.Tensor, device) -> None:
    if targets.dtype not in (torch.int64, torch.int32) or targets.device != device:
        raise ValueError(f"{name}: expected int32 or int64 on {device}, got {_shape(targets)}")


def bad_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """Where `targets` is outside [0, vocab) and not `ignore_index` (a bool tensor of its shape)."""
    return ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)


def bad_target_error(name: str, targets: torch.Tensor, bad: torch.Tensor, vocab: int,
                     ignore_index: int) -> ValueError:
    """The ValueError of `check_target_values` for targets with a `bad` entry."""
    where = bad.nonzero()[0].tolist()
    return ValueError(f"{name}: expected values in [0, {vocab}) or ignore_index={ignore_index}, "
                     f"got {int(targets[tuple(where)])} at position {where[0] if len(where) == 1 else where}")


def check_cu_seqlens(cu_seqlens, n_rows: int) -> tuple[torch.Tensor, list[int]]:
    """Returns the sequence lengths [2B] (int64, on cu_seqlens' device) and cu_seqlens as a list, read back once
    for these checks and the caller's host-side plans (each read of a CUDA tensor waits for the GPU)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        got = _shape(cu_seqlens) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens: expected a 1-D int32 or int64 tensor [2B+1], got {got}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens: expected an int32 or int64 tensor, got dtype {cu_seqlens.dtype}")
    n_seqs = cu_seqlens.numel() - 1
    if n_seqs < 2 or n_seqs % 2:
        raise ValueError(f"cu_seqlens: expected an even number (>= 2) of sequences, 2B chosen-then-rejected, "
                         f"got {n_seqs} (cu_seqlens has {cu_seqlens.numel()} entries)")
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {values[0]}")
    if values[-1] != n_rows:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[-1] == N == {n_rows} (rows of hidden), got {values[-1]}")
    for i in range(n_seqs):
        if values[i + 1] < values[i]:
            raise ValueError(f"cu_seqlens: expected non-decreasing values, got cu_seqlens[{i + 1}]={values[i + 1]} "
                             f"< cu_seqlens[{i}]={values[i]}")
    return cu_seqlens.diff().long(), values


def check_reference(ref_hidden, ref_weight, ref_bias, ref_logps, n_rows: int, vocab: int, n_seqs: int,
                    device: torch.device) -> None:
    """The reference: ref_hidden [N, H'] + ref_weight [V, H'] (+ ref_bias) or ref_logps [2B] float, or neither;
    on the policy's `device`."""
    if ref_logps is not None and (ref_hidden is not None or ref_weight is not None):
        raise ValueError("ref_logps: expected either ref_logps or ref_hidden+ref_weight, got both")
    if (ref_hidden is None) != (ref_weight is None):
        given, missing = ("ref_hidden", "ref_weight") if ref_weight is None else ("ref_weight", "ref_hidden")
        raise ValueError(f"{missing}: expected it together with {given}, got None")
    if ref_bias is not None and ref_hidden is None:
        raise ValueError("ref_bias: expected None without ref_hidden/ref_weight, got a tensor")
    if ref_hidden is not None:
        check_head("ref_", ref_hidden, ref_weight, ref_bias, n_rows=n_rows)
        if ref_hidden.device != device:
            raise ValueError(f"ref_hidden: expected a tensor on {device} like hidden, got {_shape(ref_hidden)}")
        if ref_weight.shape[0] != vocab:
            raise ValueError(f"ref_weight: expected {vocab} rows (the policy's vocabulary), got {ref_weight.shape[0]}")
    if ref_logps is not None and (not isinstance(ref_logps, torch.Tensor) or ref_logps.shape != (n_seqs,)
                                  or not ref_logps.is_floating_point() or ref_logps.device != device):
        got = _shape(ref_logps) if isinstance(ref_logps, torch.Tensor) else type(ref_logps).__name__
        raise ValueError(f"ref_logps: expected a float tensor of shape ({n_seqs},) on {device} (summed log-probs "
                         f"of the 2B sequences), got {got}")


def as_number(value) -> float | None:
    """`value` as a Python float when it is a real number (int, float, a NumPy scalar) or a one-element tensor
    that needs no gradient; None for anything else (bools included)."""
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 and not value.requires_grad else None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def checked_number(name: str, value, ok, expected: str) -> float:
    """`value` as a Python float (`as_number`) when `ok` holds for it, else a ValueError naming `name`."""
    number = as_number(value)
    if number is None or not ok(number):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return number


def check_loss_options(beta, alpha, sft_norm, loss_type, label_smoothing) -> tuple[float, float, float]:
    """Returns (beta, alpha, label_smoothing) as Python floats (NumPy scalars and one-element tensors, as Liger
    takes them, would otherwise meet the loss's tensors in NumPy's arithmetic)."""
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("sft_norm", sft_norm, SFT_NORMS)
    beta = checked_number("beta", beta, lambda x: math.isfinite(x) and x > 0, "a finite number > 0")
    alpha = check_loss_weight("alpha", alpha)
    label_smoothing = checked_number("label_smoothing", label_smoothing, lambda x: 0.0 <= x <= 0.5,
                                     "a number in [0, 0.5]")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing: expected 0 with loss_type={loss_type!r} (only 'sigmoid' "
                         f"smooths labels), got {label_smoothing}")
    return beta, alpha, label_smoothing


# Where a zero token count comes from: rpo_loss takes the counts; fused_linear_rpo_loss counts the targets
# other than ignore_index in each cu_seqlens span (an empty span, or one whose targets are all ignored).
COUNTS_GIVEN = "token_counts"
COUNTS_FROM_TARGETS = "targets (counted per cu_seqlens span, ignore_index excluded)"


def check_token_counts(counts: torch.Tensor, n_pairs: int, sft_norm: str, alpha: float,
                       per_token_pref: bool, source: str = COUNTS_GIVEN) -> None:
    """Refuses divisions by a zero token count, naming the first sequence (0..B-1 chosen) that has none, and a
    batch without any response token (its loss would come from the reference alone, with no gradient).
    `source` names the argument the counts come from (`COUNTS_GIVEN` or `COUNTS_FROM_TARGETS`)."""
    check_empty_sequences((counts == 0).tolist(), n_pairs, sft_norm, alpha, per_token_pref, source)


def check_empty_sequences(empty: list[bool], n_pairs: int, sft_norm: str, alpha: float, per_token_pref: bool,
                          source: str = COUNTS_GIVEN) -> None:
    """`check_token_counts` of `empty` (counts == 0, read back by the caller, with other values in one read)."""
    if all(empty):
        raise ValueError(f"{source}: expected response tokens in some sequence, got none in all {len(empty)}: the "
                         "loss would be a number made of the reference log-probs alone, with zero gradient")
    if per_token_pref and any(empty):
        i = empty.index(True)
        raise ValueError(f"{source}: sequence {i} ({'chosen' if i < n_pairs else 'rejected'}) has no "
                         "response tokens, but average_log_prob / loss_type='ipo' divides by its count")
    if alpha and sft_norm == "seq_mean" and any(empty[:n_pairs]):
        i = empty.index(True)
        raise ValueError(f"{source}: chosen sequence {i} has no response tokens, but "
                         "sft_norm='seq_mean' divides by its count")
    if alpha and sft_norm == "token_mean" and all(empty[:n_pairs]):
        raise ValueError(f"{source}: no chosen sequence has response tokens, but "
                         "sft_norm='token_mean' divides by their total count")


def check_sequence_logps(policy_logps, ref_logps, token_counts) -> None:
    """`rpo_loss`'s inputs: policy_logps [2B] float (B >= 1); ref_logps None or [2B] float and token_counts
    [2B] (integer or float, >= 0), both on policy_logps' device. Nothing broadcasts."""
    if (not isinstance(policy_logps, torch.Tensor) or policy_logps.dim() != 1 or not policy_logps.is_floating_point()
            or policy_logps.numel() < 2 or policy_logps.numel() % 2):
        got = _shape(policy_logps) if isinstance(policy_logps, torch.Tensor) else type(policy_logps).__name__
        raise ValueError(f"policy_logps: expected a 1-D float tensor of even length 2B >= 2 (chosen 0..B-1, then "
                         f"rejected), got {got}")
    n, device = policy_logps.numel(), policy_logps.device
    for name, t, floating in (("ref_logps", ref_logps, True), ("token_counts", token_counts, False)):
        if name == "ref_logps" and t is None:
            continue
        if (not isinstance(t, torch.Tensor) or t.shape != (n,) or t.device != device
                or (floating and not t.is_floating_point()) or t.dtype == torch.bool or t.is_complex()):
            got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
            kind = "float" if floating else "integer or float"
            raise ValueError(f"{name}: expected a {kind} tensor of shape ({n},) on {device} like policy_logps, "
                             f"got {got}")
    if bool((token_counts < 0).any()):
        raise ValueError(f"token_counts: expected counts >= 0, got {token_counts.tolist()}")


def check_op_targets(hidden, weight, targets, ignore_index: int) -> None:
    """The fused head op's own check (torch.ops.rpo_fast.linear_logprobs_fwd, called directly or from a compiled
    graph): the kernels would read out of bounds for a target outside [0, V) that is not ignore_index. One
    reduction and one host sync, small next to the [N, V] product the op computes."""
    check_targets(targets, hidden.shape[0], weight.shape[0], ignore_index, hidden.device)


def is_int(value) -> bool:
    """An int, and not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_chunk_tokens(chunk_tokens, name: str = "chunk_tokens") -> None:
    """Rows per fused-head chunk: None (the op's default budget) or an int > 0; `name` is the caller's argument."""
    if chunk_tokens is not None and not (is_int(chunk_tokens) and chunk_tokens > 0):
        raise ValueError(f"{name}: expected None or an int > 0, got {chunk_tokens!r}")


def check_head_backward(impl: str, backward: str, name: str = "backward") -> None:
    """The fused loss's `backward` choice, given its `impl`: dense runs ordinary autograd, so only "auto"."""
    check_choice(name, backward, HEAD_BACKWARDS)
    if impl == "dense" and backward != "auto":
        raise ValueError(f"{name}: expected 'auto' with impl='dense' (autograd through the full logits), "
                         f"got {backward!r}")


def check_loss_weight(name: str, value) -> float:
    """Returns the weight (or alpha) as a Python float (see `check_loss_options`)."""
    return checked_number(name, value, lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0")
