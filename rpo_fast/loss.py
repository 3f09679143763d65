"""The RPO loss: DPO plus an SFT term on the chosen responses.

Liu, Lu, Zhang et al., "Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an
Adversarial Regularizer", NeurIPS 2024 (arXiv 2405.16436). Pair convention (Liger, TRL): of 2B
sequences, 0..B-1 are chosen and B..2B-1 rejected; pair i is (i, B+i).

    s_j     = sum_t log pi(y_t | y_<t) over the response tokens of sequence j (n_j of them)
    z_i     = beta * ((s_i - s_i^ref) - (s_{B+i} - s_{B+i}^ref))     (s_j / n_j with average_log_prob)
    loss    = mean_i l(z_i) + alpha * NLL
    sigmoid: l = -(1 - eps) log sig(z) - eps log sig(-z)      (eps = label_smoothing, cDPO)
    hinge:   l = relu(1 - z)                                  (SLiC)
    ipo:     l = (z / beta - 1 / (2 beta))^2, always on per-token-averaged log-probs (IPO)
    NLL "sum":        mean_i(-s_i)                 the paper's main form; its alpha is eta * beta
    NLL "seq_mean":   mean_i(-s_i / n_i)           the paper's appendix, OpenRLHF nll_loss_coef
    NLL "token_mean": -(sum_i s_i) / (sum_i n_i)   Liger compute_nll_loss, TRL loss_type "sft"
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import checks
from .autocast import outside_autocast
from .compile_boundary import opaque_to_compile
from .fwdgrad import fwdgrad_head_loss
from .logprobs import check_kernels_runnable, resolve_impl, unchecked_linear_logprobs
from .segments import segment_sum


class RPOOutput(NamedTuple):
    """Result of an RPO loss evaluation. Per-pair tensors are [B] float32."""

    loss: torch.Tensor  # scalar: pref_loss + alpha * nll (fused_linear_rpo_loss: each term times its weight)
    pref_loss: torch.Tensor  # scalar: mean over pairs of the preference term
    nll: torch.Tensor  # scalar: the sft_norm-normalized SFT term before alpha; alpha=0: a detached metric, same norm
    chosen_logps: torch.Tensor  # summed over response tokens
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor  # summed; zeros when reference-free
    ref_rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor  # beta * (s - s_ref), over the token count with average_log_prob or ipo; detached
    rejected_rewards: torch.Tensor
    chosen_token_counts: torch.Tensor  # response tokens per sequence, float32
    rejected_token_counts: torch.Tensor


def uses_per_token_logps(average_log_prob: bool, loss_type: str) -> bool:
    """Whether the preference term sees per-token-averaged log-probs (average_log_prob, and always for IPO)."""
    return average_log_prob or loss_type == "ipo"


def preference_losses(z: torch.Tensor, beta: float, loss_type: str, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair preference term l(z) for `z = beta * (chosen log-ratio - rejected log-ratio)`."""
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":
        return (z / beta - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type: expected one of {list(checks.LOSS_TYPES)}, got {loss_type!r}")


def sft_nll(chosen_logps: torch.Tensor, chosen_counts: torch.Tensor, sft_norm: str,
            empty_ok: bool = False) -> torch.Tensor:
    """The SFT term on chosen sequences: summed log-probs [B] and token counts [B] -> scalar NLL. With `empty_ok`
    (a metric, alpha = 0) a sequence or batch without tokens is divided by 1, not 0 (its log-prob sum is 0)."""
    if sft_norm == "sum":
        return -chosen_logps.mean()
    if sft_norm == "seq_mean":
        return -(chosen_logps / (chosen_counts.clamp(min=1) if empty_ok else chosen_counts)).mean()
    if sft_norm == "token_mean":
        total = chosen_counts.sum()
        return -chosen_logps.sum() / (total.clamp(min=1) if empty_ok else total)
    raise ValueError(f"sft_norm: expected one of {list(checks.SFT_NORMS)}, got {sft_norm!r}")


def rpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    token_counts: torch.Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    sft_norm: str = "token_mean",
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    average_log_prob: bool = False,
) -> RPOOutput:
    """RPO from per-sequence summed log-probs.

    Args:
        policy_logps: [2B] float summed response log-probs of the policy (differentiable), chosen first.
        ref_logps: [2B] float summed log-probs of the reference, or None (reference-free).
        token_counts: [2B] response tokens per sequence, an integer or float tensor.
        beta, alpha, sft_norm, loss_type, label_smoothing, average_log_prob: see the module docstring.

    Returns:
        RPOOutput, computed in float32.

    Raises:
        ValueError: on bad options, shapes, dtypes or devices (nothing broadcasts), when a normalization would
            divide by a zero token count, or when no sequence has a response token.
    """
    beta, alpha, label_smoothing = checks.check_loss_options(beta, alpha, sft_norm, loss_type, label_smoothing)
    checks.check_sequence_logps(policy_logps, ref_logps, token_counts)
    n_pairs = policy_logps.shape[0] // 2
    per_token = uses_per_token_logps(average_log_prob, loss_type)
    checks.check_token_counts(token_counts.to(torch.float32), n_pairs, sft_norm, alpha, per_token)
    return rpo_terms(policy_logps, ref_logps, token_counts, beta=beta, alpha=alpha, sft_norm=sft_norm,
                     loss_type=loss_type, label_smoothing=label_smoothing, average_log_prob=average_log_prob)


def rpo_terms(policy_logps: torch.Tensor, ref_logps: torch.Tensor | None, token_counts: torch.Tensor, *,
              beta: float, alpha: float, sft_norm: str, loss_type: str, label_smoothing: float,
              average_log_prob: bool, pair_weight: float = 1.0, nll_weight: float = 1.0) -> RPOOutput:
    """`rpo_loss` without its checks (no host synchronization): the one copy of the loss formulas, which
    the forward-time-gradient head also differentiates, pair by pair.

    `loss = pair_weight * pref_loss + nll_weight * alpha * nll`. A trainer that splits a step into micro-batches
    weights each micro-batch's preference term by its share of the step's pairs; with sft_norm="token_mean" the
    NLL term must count by its share of the step's chosen tokens instead, or the step's NLL is a mean of
    per-micro-batch means. `pref_loss` and `nll` are reported unweighted."""
    n_pairs = policy_logps.shape[0] // 2
    counts = token_counts.to(torch.float32)
    per_token = uses_per_token_logps(average_log_prob, loss_type)
    policy = policy_logps.float()
    ref = torch.zeros_like(policy) if ref_logps is None else ref_logps.detach().float()

    # The preference term sees per-token averages with average_log_prob (and always for IPO).
    scale = counts if per_token else torch.ones_like(counts)
    logratios = (policy - ref) / scale
    z = beta * (logratios[:n_pairs] - logratios[n_pairs:])
    pref_loss = preference_losses(z, beta, loss_type, label_smoothing).mean()
    if alpha:
        nll = sft_nll(policy[:n_pairs], counts[:n_pairs], sft_norm)
    else:  # plain DPO: the NLL as a metric in the same normalization (comparable with RPO runs' nll)
        nll = sft_nll(policy[:n_pairs], counts[:n_pairs], sft_norm, empty_ok=True).detach()
    rewards = (beta * logratios).detach()
    return RPOOutput(
        loss=pair_weight * pref_loss + nll_weight * alpha * nll if alpha else pair_weight * pref_loss,
        pref_loss=pref_loss,
        nll=nll,
        chosen_logps=policy[:n_pairs],
        rejected_logps=policy[n_pairs:],
        ref_chosen_logps=ref[:n_pairs],
        ref_rejected_logps=ref[n_pairs:],
        chosen_rewards=rewards[:n_pairs],
        rejected_rewards=rewards[n_pairs:],
        chosen_token_counts=counts[:n_pairs],
        rejected_token_counts=counts[n_pairs:],
    )


def resolve_head_backward(backward: str, impl: str, dtype: torch.dtype, needs_grad: bool) -> str:
    """`fused_linear_rpo_loss`'s `backward` with "auto" resolved: "fwdgrad" when a gradient is needed, `impl`
    is not "dense" and the inputs are not fp16; else "recompute". Other values are returned as given.

    Not fwdgrad for fp16: it rounds the gradients to fp16 in forward, at the loss's scale of 1, and backward
    only multiplies them by `grad_output`. Under loss scaling (a GradScaler's loss x 65536, which fp16 training
    needs) the small entries have underflowed to 0 (or lost their bits as subnormals) before the scale comes;
    recompute forms them in backward from the scaled `grad_output`, where they are normal fp16 numbers. bf16
    has fp32's exponent range, and fp32 its own."""
    if backward != "auto":
        return backward
    return "fwdgrad" if needs_grad and impl != "dense" and dtype != torch.float16 else "recompute"


@opaque_to_compile
@outside_autocast("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias")
def fused_linear_rpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    alpha: float = 1.0,
    sft_norm: str = "token_mean",
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    impl: str = "auto",
    backward: str = "auto",
    chunk_tokens: int | None = None,
    pair_weight: float = 1.0,
    nll_weight: float = 1.0,
) -> RPOOutput:
    """RPO loss straight from packed hidden states: LM head, log-softmax, gather and loss, fused.

    Args:
        hidden: [N, H] bf16/fp16/fp32, the policy's last hidden states at response positions of 2B
            packed sequences (chosen 0..B-1 first, then rejected B..2B-1).
        weight: [V, H] LM head, same dtype; bias: [V] or None.
        targets: [N] int64 next tokens; `ignore_index` marks positions that do not count.
        cu_seqlens: [2B+1] int32 or int64 sequence boundaries in `hidden`, from 0 to N.
        ref_hidden, ref_weight, ref_bias: the reference head's inputs ([N, H'], [V, H'], [V]); run
            forward-only, nothing saved, no gradient. Or `ref_logps`: [2B] precomputed summed
            reference log-probs. Neither: reference-free.
        beta, alpha, sft_norm, loss_type, label_smoothing, average_log_prob: see the module docstring.
        impl: "auto" | "triton" | "torch" | "dense": the kernels of the head's forward passes (see
            `linear_logprobs`): the reference head's forward, and the policy's forward with "recompute" /
            "atomic"; with "fwdgrad", whose products are torch matmuls, it picks the per-chunk log-softmax and
            gradient passes (Triton kernels for "triton" / "auto" on CUDA; torch ops otherwise, also on CPU
            under TRITON_INTERPRET=1). "dense" is the full-logits reference (autograd, `backward` must be
            "auto").
        backward: how the gradient is made.
            "fwdgrad": in forward, chunk by chunk of whole pairs (`rpo_fast.fwdgrad`): three head GEMMs, no
                recompute; the loss's backward only scales the stored gradients. Only `loss` carries a
                gradient; every other RPOOutput field is a detached metric. First order only: differentiating
                its gradients (`create_graph=True`) raises, as with the op's backwards; impl="dense"
                differentiates twice. Not for fp16 under loss scaling (a GradScaler; why:
                `resolve_head_backward`): "auto" does not pick it for fp16.
            "recompute": the `linear_logprobs` op, whose backward recomputes each chunk's logits (four GEMMs).
            "atomic": the same op with the Triton backward kernel (fp32 atomics; a GPU, or the CPU under
                TRITON_INTERPRET=1; not deterministic).
            "auto": "fwdgrad" when a gradient is needed (grad mode on and hidden, weight or bias requires
                grad) and the inputs are bf16 or fp32; else "recompute" (without a gradient its forward is the
                `linear_logprobs` op's alone, with no gradient buffers; with fp16 inputs its gradients are formed
                from the scaled `grad_output`: `resolve_head_backward`). Both are exact, and deterministic where
                PyTorch's ops are: on CUDA under `torch.use_deterministic_algorithms(True)` (the per-sequence
                sums are `index_add`s).
        chunk_tokens: rows per fwdgrad chunk (whole pairs; a longer pair is recomputed in pieces of this
            many rows); None: as many as fit a logits budget (`fwdgrad.default_chunk_tokens`). Unused where
            the backward is not fwdgrad.
        pair_weight, nll_weight: `loss = pair_weight * pref_loss + nll_weight * alpha * nll` (a trainer's
            micro-batch weights; they must be known in forward, where fwdgrad makes the gradient).
            `pref_loss` and `nll` are reported unweighted.

    Under `torch.autocast`, the heads' inputs (hidden, weight, bias and the ref_ ones) are first cast to
    autocast's dtype, as a `Linear`'s would be; the head and the loss run with autocast off (`rpo_fast.autocast`).

    Opaque to `torch.compile` (`torch.compiler.disable`): a compiled caller breaks its graph at this call, which
    runs eagerly, and is not recompiled when N or B changes. Its checks and chunk plans read `cu_seqlens` and the
    targets back on the host; traced, their values became guards that recompiled per batch shape, up to dynamo's
    recompile limit (the heads are custom ops and the loss formulas work on [2B] tensors: compiling gains nothing).

    Returns:
        RPOOutput.

    Raises:
        ValueError: naming the argument, for every malformed input (shapes, dtypes, cu_seqlens,
            targets out of range, half-given reference, unknown options, empty sequences that a
            normalization would divide by, impl="triton" / backward="atomic" on CPU tensors without
            TRITON_INTERPRET=1).
    """
    beta, alpha, label_smoothing = checks.check_loss_options(beta, alpha, sft_norm, loss_type, label_smoothing)
    checks.check_choice("impl", impl, checks.IMPLS)
    checks.check_head_backward(impl, backward)
    checks.check_chunk_tokens(chunk_tokens)
    pair_weight = checks.check_loss_weight("pair_weight", pair_weight)
    nll_weight = checks.check_loss_weight("nll_weight", nll_weight)
    checks.check_head("", hidden, weight, bias)
    impl = resolve_impl(impl, hidden.device)
    check_kernels_runnable(impl, backward, hidden)
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    checks.check_targets(targets, n_rows, vocab, ignore_index, hidden.device, values=False)  # values: below
    lengths, bounds = checks.check_cu_seqlens(cu_seqlens, n_rows)
    checks.check_reference(ref_hidden, ref_weight, ref_bias, ref_logps, n_rows, vocab, lengths.numel(), hidden.device)
    counts = segment_sum((targets != ignore_index).float(), lengths)
    n_pairs = lengths.numel() // 2
    per_token = uses_per_token_logps(average_log_prob, loss_type)
    # The targets' values and the token counts, read back at once (each read of a CUDA tensor waits for the GPU).
    bad = checks.bad_targets(targets, vocab, ignore_index)
    any_bad, *empty = torch.cat([bad.any()[None], counts == 0]).tolist()
    if any_bad:
        raise checks.bad_target_error("targets", targets, bad, vocab, ignore_index)
    checks.check_empty_sequences(empty, n_pairs, sft_norm, alpha, per_token, source=checks.COUNTS_FROM_TARGETS)

    # The heads and the loss below run without their own checks of what was checked above.
    if ref_hidden is not None:
        with torch.no_grad():
            ref_lp = unchecked_linear_logprobs(ref_hidden, ref_weight, targets, ref_bias, ignore_index, impl,
                                               "recompute")
        ref_logps = segment_sum(ref_lp, lengths)
    options = dict(beta=beta, alpha=alpha, sft_norm=sft_norm, loss_type=loss_type, label_smoothing=label_smoothing,
                   average_log_prob=average_log_prob, pair_weight=pair_weight, nll_weight=nll_weight)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    backward = resolve_head_backward(backward, impl, hidden.dtype, needs_grad)
    if backward == "fwdgrad":
        def sequence_loss(policy_logps):  # the same formulas as rpo_loss, differentiated chunk by chunk
            out = rpo_terms(policy_logps, ref_logps, counts, **options)
            return out.loss, out

        loss, out = fwdgrad_head_loss(hidden, weight, bias, targets.long(), bounds, sequence_loss,
                                      ignore_index=ignore_index, chunk_tokens=chunk_tokens,
                                      use_kernels=hidden.is_cuda and impl == "triton")
        return out._replace(loss=loss)

    lp = unchecked_linear_logprobs(hidden, weight, targets, bias, ignore_index, impl, backward)
    return rpo_terms(segment_sum(lp, lengths), ref_logps, counts, **options)
