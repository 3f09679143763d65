"""rpo-fast: fused-kernel Regularized Preference Optimization (DPO + SFT on the chosen response).

Public API:
    linear_logprobs        per-token log-probs of targets under a linear LM head, no [N, V] logits
    fused_linear_rpo_loss  the RPO loss from packed hidden states -> RPOOutput
    rpo_loss               the RPO loss from per-sequence summed log-probs -> RPOOutput
    RPOOutput              the losses' result: loss, its terms, per-pair log-probs, rewards, token counts
    RPOLoss                drop-in for liger_kernel's LigerFusedLinearDPOLoss
    dense_linear_logprobs  the same log-probs with the full [N, V] logits materialized (reference)
"""
from .liger_compat import RPOLoss
from .logprobs import linear_logprobs
from .loss import RPOOutput, fused_linear_rpo_loss, rpo_loss
from .reference import dense_linear_logprobs

__version__ = "0.1.0"
__all__ = ["linear_logprobs", "fused_linear_rpo_loss", "rpo_loss", "RPOOutput", "RPOLoss", "dense_linear_logprobs"]
