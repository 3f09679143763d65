"""Model plumbing shared by the integrations: the LM head's parameters and logit scale, the fused head (log-probs,
or the whole RPO loss) on gathered response rows, and a chunked no-grad pass for the logging statistics.

None of these functions build the [tokens, V] logits: the head runs through `rpo_fast.linear_logprobs` or
`rpo_fast.fused_linear_rpo_loss` (chunks of at most [chunk, V]), and the statistics pass walks the rows in
chunks of `metrics_chunk_rows`.
"""
from __future__ import annotations

import functools
import types

import torch

from ..autocast import autocast_dtype
from ..logprobs import linear_logprobs
from ..loss import RPOOutput, fused_linear_rpo_loss

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()

def forward_function(module: torch.nn.Module):
    """`module.forward` as a function of (module, *args, **kwargs), for a forward that an integration replaces and
    calls on: a method bound to `module` becomes its function, called with the module it runs on, so that a
    deepcopy of the module (whose `forward` the copy binds to itself) runs on the copy's weights, not on the
    original's. Any other callable (not bound to `module`) is called as it is."""
    forward = module.forward
    if isinstance(forward, types.MethodType) and forward.__self__ is module:
        return forward.__func__
    return functools.partial(_call_unbound, forward)


def _call_unbound(forward, module, *args, **kwargs):
    return forward(*args, **kwargs)


# One statistics chunk's fp32 logits: 2**25 x 4 B = 128 MiB, i.e. 261 tokens at a 128256-token vocab. Larger
# than the op's own chunks because this pass is one GEMM per chunk (reads the whole head each time).
METRICS_CHUNK_ELEMENTS = 2**25


def metrics_chunk_rows(vocab_size: int, chunk_size: int | None = None) -> int:
    return chunk_size or max(1, METRICS_CHUNK_ELEMENTS // max(1, vocab_size))


def logit_scale_of(config) -> float:
    """The factor the model applies to `hidden @ W.T + b` before the softmax (1.0 for Llama, Qwen, Mistral).

    Read the way TRL's fused head reads it: `logit_scale` (Cohere), `output_multiplier`, `lm_head_multiplier`
    (Falcon-H1), `1 / logits_scaling` (Granite, MiniCPM3; HyperCLOVA X multiplies).

    Raises:
        ValueError: for `final_logit_softcapping` (Gemma 2), a nonlinear cap the fused op does not apply.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        raise ValueError(f"model config: expected final_logit_softcapping=None (rpo_fast's head applies no softcap), "
                         f"got {text_config.final_logit_softcapping}")
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(text_config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if getattr(text_config, "model_type", "") == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def lm_head_of(model: torch.nn.Module) -> torch.nn.Module:
    """The model's LM head module (`get_output_embeddings()`), refused where the fused head would read the wrong
    weight.

    A PEFT tuner layer on the head (LoRA with "lm_head" in target_modules: it has `base_layer` and `lora_A`)
    adds its adapter's output in its own forward, which the fused head never calls: it would read
    `base_layer.weight` alone, score without the adapter and give the adapter no gradient. PEFT's
    `modules_to_save` copy (ModulesToSaveWrapper) is fine: its `weight` is the active copy's.

    Raises:
        ValueError: for a model without an LM head, or with a PEFT tuner layer on it.
    """
    lm_head = model.get_output_embeddings()
    if lm_head is None or not hasattr(lm_head, "weight"):
        raise ValueError(f"model: expected an LM head from get_output_embeddings(), got {type(lm_head).__name__}")
    if hasattr(lm_head, "base_layer") or hasattr(lm_head, "lora_A"):
        raise ValueError(f"model: expected an LM head without a PEFT adapter (rpo_fast's fused head reads its weight "
                         f"and would skip the adapter), got {type(lm_head).__module__}.{type(lm_head).__name__}; drop "
                         "'lm_head' from LoraConfig.target_modules, or train it whole with modules_to_save=['lm_head']")
    return lm_head


def head_of(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(weight [V, H], bias [V] or None, logit scale) of the model's LM head (`lm_head_of`)."""
    lm_head = lm_head_of(model)
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if isinstance(weight, DTensor):  # FSDP2 shards: gather once per call, as TRL does
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    return weight, bias, logit_scale_of(model.config)


def wants_router_logits(config) -> bool:
    """Whether a MoE model's own training forward adds its router load-balancing loss (output_router_logits)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text_config, "output_router_logits", False))


def router_aux_loss(config, router_logits, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """(the router load-balancing loss, its coefficient `router_aux_loss_coef`), as a MoE causal LM's own forward
    adds them to its loss (transformers' `load_balancing_loss_func`, Mixtral's; the MoE families share it);
    `attention_mask` [R, T] marks the tokens that count (None: all, as in a packed row)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    aux_loss = load_balancing_loss_func(router_logits, text_config.num_experts, text_config.num_experts_per_tok,
                                        attention_mask)
    return aux_loss, float(getattr(text_config, "router_aux_loss_coef", 0.0))


def prepare_head_inputs(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    scale: float = 1.0,
    cast_to_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Puts rows [N, H], weight [V, H] and bias [V] in the dtype the model's own head would compute in
    (autocast's when it is on, float32 with `cast_to_fp32`, else the weight's) and folds the logit scale
    into rows and bias: `s * (h W^T + b) = (s h) W^T + s b`. Differentiable."""
    dtype = torch.float32 if cast_to_fp32 else autocast_dtype(rows.device) or weight.dtype
    rows, weight = rows.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if scale != 1.0:
        rows = rows * scale
        bias = None if bias is None else bias * scale
    return rows, weight, bias


def head_logprobs(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, *,
                  impl: str = "auto") -> torch.Tensor:
    """`log_softmax(rows @ weight.T + bias)[targets]` through `rpo_fast.linear_logprobs`.

    Args:
        rows: [N, H], weight: [V, H], bias: [V] or None, one dtype (`prepare_head_inputs`).
        targets: [N] int64, all scored.

    Returns:
        [N] float32, differentiable in rows, weight and bias.
    """
    with torch.autocast(rows.device.type, enabled=False):  # the op picks its own accumulation dtypes
        return linear_logprobs(rows, weight, targets, bias, impl=impl)


def head_rpo_loss(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                  cu_seqlens: torch.Tensor, **loss_options) -> RPOOutput:
    """`rpo_fast.fused_linear_rpo_loss` on gathered rows: the RPO loss of 2B sequences, the head fused in.

    Args:
        rows: [N, H], weight: [V, H], bias: [V] or None, one dtype (`prepare_head_inputs`).
        targets: [N] int64, all scored. cu_seqlens: [2B+1] int32 sequence boundaries in rows (chosen first).
        loss_options: the op's keywords (beta, alpha, ..., ref_logps, impl, backward, pair_weight, nll_weight).
    """
    with torch.autocast(rows.device.type, enabled=False):  # the op picks its own accumulation dtypes
        return fused_linear_rpo_loss(rows, weight, targets, cu_seqlens, bias=bias, **loss_options)


@torch.no_grad()
def head_statistics(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    wanted: set[str] | frozenset[str],
    *,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-row statistics of the next-token distribution, no gradient, in chunks of rows.

    `wanted` is a subset of {"entropy", "mean_logits", "is_top1", "log_sum_sq_probs"} (TRL's
    `FusedCausalLMOutput` fields, same definitions: `is_top1` means the target is the first argmax).
    `mean_logits` alone needs no vocab pass: `mean_v z_v = (h . sum_v W_v + sum_v b_v) / V`.

    Returns:
        name -> [N] (float32; bool for is_top1).
    """
    rows, weight = rows.detach(), weight.detach()
    bias = None if bias is None else bias.detach()
    n_rows, vocab = rows.shape[0], weight.shape[0]
    out: dict[str, torch.Tensor] = {}
    if not wanted:
        return out
    if set(wanted) == {"mean_logits"}:
        bias_sum = bias.sum(dtype=torch.float32) if bias is not None else 0.0
        out["mean_logits"] = (rows.float() @ weight.sum(0, dtype=torch.float32) + bias_sum) / vocab
        return out
    for name in wanted:
        dtype = torch.bool if name == "is_top1" else torch.float32
        out[name] = torch.empty(n_rows, dtype=dtype, device=rows.device)
    step = metrics_chunk_rows(vocab, chunk_size)
    with torch.autocast(rows.device.type, enabled=False):
        for start in range(0, n_rows, step):
            sl = slice(start, start + step)
            z = rows[sl] @ weight.T
            if bias is not None:
                z = z + bias
            z = z.float()
            lse = torch.logsumexp(z, dim=-1)
            if "mean_logits" in wanted:
                out["mean_logits"][sl] = z.mean(-1)
            if "is_top1" in wanted:
                out["is_top1"][sl] = z.argmax(-1) == targets[sl]
            if "log_sum_sq_probs" in wanted:
                out["log_sum_sq_probs"][sl] = torch.logsumexp(2 * (z - lse[:, None]), dim=-1)
            if "entropy" in wanted:
                z.sub_(lse[:, None])  # log p, in place: one [chunk, V] buffer plus one for p
                out["entropy"][sl] = -(z.exp() * z).sum(-1)
    return out
