"""`RPOLoss`: a drop-in for `liger_kernel.chunked_loss.LigerFusedLinearDPOLoss` on the fused kernels.

Same constructor keywords, same `forward(lin_weight, _input, target, bias, ref_input, ref_weight,
ref_bias)` on padded `[2B, T, H]` inputs (chosen rows first), same return value. Internally the padded
batch is packed down to its scored tokens, so padding costs no head FLOPs.
"""
from __future__ import annotations

import torch

from . import checks
from .compile_boundary import opaque_to_compile
from .loss import fused_linear_rpo_loss

# Liger loss types this module does not implement (they are not RPO's preference term).
_LIGER_ONLY_LOSS_TYPES = ("exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
                          "discopop")


class RPOLoss(torch.nn.Module):
    """Fused linear + DPO/RPO loss with Liger's interface.

    The SFT term is `alpha * nll` when `compute_nll_loss` (Liger's default form is `sft_norm="token_mean"`:
    NLL summed over chosen tokens / chosen token count); `sft_norm="sum"` is the paper's main form and
    `"seq_mean"` its appendix / OpenRLHF's. `compiled` and `chunk_size` are accepted for compatibility and
    have no effect (nothing is compiled or chunked by sequences here; in a caller's `torch.compile`d code,
    `forward` is opaque, one graph break that no batch shape recompiles, as `fused_linear_rpo_loss`), and so is
    `discopop_tau` (Liger's "discopop" loss is not implemented here); `impl`, `backward` and
    `chunk_tokens` are `fused_linear_rpo_loss`'s (by default, for bf16/fp32 inputs, the gradient is formed in
    forward, chunk by chunk of whole pairs: only the returned loss is differentiable, the other outputs are
    detached metrics). Unlike Liger 0.8.5,
    `label_smoothing` applies to `loss_type="sigmoid"` (cDPO); Liger ignores it there, and so does TRL 1.16's
    DPOTrainer (it smooths only its "robust", "exo_pair", "aot" and "aot_unpaired" losses).

    Raises:
        ValueError: for a Liger loss type that is not implemented here, an unknown option, or (in forward) a
            malformed input. A bad `target` (shape or value, at [row, column]) and `_input`/`ref_input` shapes
            are named as passed; the heads' shape and dtype mismatches are `fused_linear_rpo_loss`'s errors,
            named as there (`hidden` [N, H] is the packed `_input`, `weight` is `lin_weight`).
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        sft_norm: str = "token_mean",
        impl: str = "auto",
        backward: str = "auto",
        chunk_tokens: int | None = None,
    ):
        super().__init__()
        if loss_type in _LIGER_ONLY_LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {list(checks.LOSS_TYPES)} (rpo_fast does not implement "
                             f"Liger's {loss_type!r}), got {loss_type!r}")
        beta, alpha, label_smoothing = checks.check_loss_options(beta, alpha, sft_norm, loss_type, label_smoothing)
        checks.check_choice("impl", impl, checks.IMPLS)
        checks.check_head_backward(impl, backward)
        checks.check_chunk_tokens(chunk_tokens)
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.discopop_tau = discopop_tau
        self.sft_norm = sft_norm
        self.impl = impl
        self.backward = backward
        self.chunk_tokens = chunk_tokens

    @opaque_to_compile
    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        """
        Args:
            lin_weight: [V, H]. _input: [2B, T, H] (rows 0..B-1 chosen). target: [2B, T] int64.
            bias: [V] or None. ref_input [2B, T, H'], ref_weight [V, H'], ref_bias [V]: the reference
                head, used when `use_ref_model`.

        Returns:
            `(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
            chosen_rewards, rejected_rewards))` as Liger returns them: logps are per-token averages when
            `average_log_prob`, `nll_loss` is 0 unless `compute_nll_loss`, the logits means run over every
            position and vocab entry of the chosen (rejected) rows.
        """
        if not isinstance(_input, torch.Tensor) or _input.dim() != 3 or _input.shape[0] < 2 or _input.shape[0] % 2:
            raise ValueError(f"_input: expected a [2B, T, H] tensor, B >= 1 (chosen rows, then as many rejected), "
                             f"got {tuple(_input.shape) if isinstance(_input, torch.Tensor) else type(_input).__name__}")
        if not isinstance(target, torch.Tensor) or target.shape != _input.shape[:2]:
            raise ValueError(f"target: expected shape {tuple(_input.shape[:2])} (the [2B, T] of _input), got "
                             f"{tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__}")
        checks.check_target_dtype("target", target, _input.device)  # its values: with the fused loss's reads
        if self.use_ref_model and (ref_input is None or ref_weight is None):
            raise ValueError("ref_input/ref_weight: expected tensors with use_ref_model=True, got None")
        if self.use_ref_model and (ref_input.dim() != 3 or ref_input.shape[:2] != _input.shape[:2]):
            raise ValueError(f"ref_input: expected a [2B, T, H'] tensor with [2B, T]={tuple(_input.shape[:2])} like "
                             f"_input, got {tuple(ref_input.shape)}")
        n_seqs, seq_len = _input.shape[:2]
        scored = target != self.ignore_index
        cu_seqlens = torch.zeros(n_seqs + 1, dtype=torch.int32, device=target.device)
        cu_seqlens[1:] = scored.sum(1).cumsum(0)
        # The scored positions found once (a boolean-mask index per tensor would each read the count back).
        rows = scored.flatten().nonzero().squeeze(1)
        try:
            out = fused_linear_rpo_loss(
                _input.flatten(0, 1).index_select(0, rows), lin_weight, target.flatten().index_select(0, rows),
                cu_seqlens, bias=bias,
                ref_hidden=ref_input.flatten(0, 1).index_select(0, rows) if self.use_ref_model else None,
                ref_weight=ref_weight if self.use_ref_model else None,
                ref_bias=ref_bias if self.use_ref_model else None,
                beta=self.beta, alpha=self.alpha if self.compute_nll_loss else 0.0, sft_norm=self.sft_norm,
                loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                average_log_prob=self.average_log_prob, ignore_index=self.ignore_index, impl=self.impl,
                backward=self.backward, chunk_tokens=self.chunk_tokens,
            )
        except ValueError as error:
            # The fused loss reads the packed targets' values back with its token counts (one host read for both).
            # A bad value is scored, hence packed: it is named here as the caller's `target` [2B, T] at [row,
            # column], not as the packed targets (N,), in preference to the fused loss's other errors.
            if isinstance(lin_weight, torch.Tensor) and lin_weight.dim() == 2:
                bad = checks.bad_targets(target, lin_weight.shape[0], self.ignore_index)
                if bool(bad.any()):
                    error = checks.bad_target_error("target", target, bad, lin_weight.shape[0], self.ignore_index)
            raise error from None
        chosen, rejected = out.chosen_logps, out.rejected_logps
        if self.average_log_prob:
            chosen, rejected = chosen / out.chosen_token_counts, rejected / out.rejected_token_counts
        nll = out.nll if self.compute_nll_loss else torch.zeros((), device=_input.device)

        # Mean logit over all positions and vocab entries, without logits: sum_v logit = h . sum_v w + sum_v b,
        # summed over a row's positions first. Reductions accumulate in fp32 with no fp32 copy of the weight or
        # input (the weight's would be 4*V*H bytes); the products are elementwise, which autocast leaves alone.
        with torch.no_grad():
            weight_sum = lin_weight.sum(0, dtype=torch.float32)
            bias_sum = bias.sum(dtype=torch.float32) if bias is not None else 0.0
            n_pairs = n_seqs // 2
            denom = n_pairs * seq_len * lin_weight.shape[0]
            per_seq = (_input.sum(1, dtype=torch.float32) * weight_sum).sum(1) + seq_len * bias_sum
            chosen_logits_mean = per_seq[:n_pairs].sum() / denom
            rejected_logits_mean = per_seq[n_pairs:].sum() / denom
        return out.loss, (chosen, rejected, chosen_logits_mean, rejected_logits_mean, nll,
                          out.chosen_rewards, out.rejected_rewards)
