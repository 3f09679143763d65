"""`transformers.Trainer` on preference batches, with the RPO loss on rpo_fast's fused head.

Batch format (what `PreferenceCollator` builds; the usual padded DPO batch): `input_ids`,
`attention_mask`, `labels`, all [2B, T], rows 0..B-1 chosen and B..2B-1 rejected (pair i = (i, B+i)),
`labels` HF-style (aligned with input_ids, -100 on prompt and padding, shifted inside). Optional
`ref_chosen_logps`, `ref_rejected_logps`: [B] precomputed summed reference log-probs.

The loss is RPO (formulas in `rpo_fast.loss`):

    loss = mean_i l(z_i) + alpha * NLL,   z_i = beta * ((s_i - s_i^ref) - (s_{B+i} - s_{B+i}^ref))
    sft_norm="token_mean" (default; TRL's "sft", Liger):  NLL = -(sum_i s_i) / (sum_i n_i)
    sft_norm="sum"        (the paper's main form, alpha = eta * beta):  NLL = mean_i(-s_i)
    sft_norm="seq_mean"   (the paper's appendix, OpenRLHF nll_loss_coef):  NLL = mean_i(-s_i / n_i)

The policy's loss is `rpo_fast.fused_linear_rpo_loss` on the response positions only, run inside the model's
forward (so a DDP/FSDP wrapper sees the LM head used in its forward); the [tokens, V] logits never exist. Its
default `head_backward="auto"` forms the gradient in that forward (`rpo_fast.fwdgrad`: three head GEMMs per
token, no recompute; `loss.backward()` only scales the stored gradients; not for fp16, whose loss scaling
would come too late: there "auto" is the recompute backward), which needs the reference log-probs
and the micro-batch's loss weights before the policy runs: the reference goes first (forward only, through
`rpo_fast.linear_logprobs`), and the gradient-accumulation weights enter the op as `pair_weight` /
`nll_weight`. `packed=True` drops the padding first (`rpo_fast.integrations.padded.pack_padded_pairs`):
one row, position_ids restarting per sequence, no attention mask. transformers reads the sequence boundaries
from those position_ids (tested: eager and sdpa, transformers 5.24; flash_attention_2 does the same by
design); a model whose attention ignores them (OPT, MPT, Bloom, Mamba) must stay padded: on each model's first
packed batch `check_packed_layout` compares the packed and padded log-probs and raises a ValueError for such a
model (`check_packing=False` skips it). With `share_prompt` (`RPOArguments`'
default; `rpo_compute_loss`, `sequence_logps` and `head_layout` default to False) and a model on rpo_fast's
packed attention (`attn_implementation=rpo_fast.attention.register()`), a pair whose two rows hold the same
prompt before their labels is packed `[prompt][chosen][rejected]` (`rpo_fast.packing`): the prompt runs
once, same numbers; otherwise the batch packs unshared (with a one-line warning for the model). A model on that
attention is packed (unshared) with `packed=False` too: it reads no padding mask, so padded rows would attend to
their padding.

    class MyTrainer(RPOTrainerMixin, transformers.Trainer):
        pass

    trainer = MyTrainer(model=model, ref_model=ref, rpo_args=RPOArguments(beta=0.1, alpha=0.5),
                        args=TrainingArguments(..., remove_unused_columns=False),
                        train_dataset=ds, data_collator=PreferenceCollator(pad_token_id=tok.pad_token_id))
"""
from __future__ import annotations

import functools
import types
import warnings
import weakref
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch

from ..checks import IMPLS, check_choice, check_chunk_tokens, check_head_backward, check_loss_options
from ..loss import RPOOutput
from ..segments import segment_sum
from ._model import (forward_function, head_logprobs, head_of, head_rpo_loss, lm_head_of, logit_scale_of,
                     prepare_head_inputs, router_aux_loss, wants_router_logits)
from .padded import check_no_label_under_padding, pack_padded_pairs, pairs_from_padded


@dataclass
class RPOArguments:
    """RPO loss options (see the module docstring for the formulas)."""

    beta: float = 0.1
    alpha: float = 1.0  # 0.0 is plain DPO
    sft_norm: str = "token_mean"  # "token_mean" | "sum" | "seq_mean"
    loss_type: str = "sigmoid"  # "sigmoid" | "hinge" | "ipo"
    label_smoothing: float = 0.0
    average_log_prob: bool = False
    packed: bool = False  # drop the padding before the backbone
    share_prompt: bool = True  # packed: each pair's prompt once, where the model's attention can (docstring)
    reference_free: bool = False  # allow running with no reference at all (s^ref = 0)
    impl: str = "auto"  # the head's forward kernels (rpo_fast.fused_linear_rpo_loss's impl)
    head_backward: str = "auto"  # fused_linear_rpo_loss's backward: "auto" forms the gradient in forward
    head_chunk_tokens: int | None = None  # its chunk_tokens: rows per fwdgrad chunk; None: what fits a logits budget
    check_packing: bool = True  # packed: refuse, on its first batch, a model whose attention mixes packed sequences

    def __post_init__(self):
        # beta, alpha and label_smoothing here, not at the first step (the loss checks them there too)
        check_loss_options(self.beta, self.alpha, self.sft_norm, self.loss_type, self.label_smoothing)
        check_choice("impl", self.impl, IMPLS)
        check_head_backward(self.impl, self.head_backward, "head_backward")
        check_chunk_tokens(self.head_chunk_tokens, "head_chunk_tokens")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strips DDP / DataParallel and torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    model = _unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the patched module


class HeadRequest(NamedTuple):
    """What the installed head forward computes from the backbone's last hidden states `hidden` [R, T, H].

    The head's rows are `hidden.flatten(0, 1)[index]`, sequence after sequence (the 2B sequences of B pairs,
    chosen first); a position may repeat (in a shared-prompt row the prompt's last token scores both responses).
    """

    index: torch.Tensor  # [N] int64 positions in the flattened [R * T] hidden states
    targets: torch.Tensor  # [N] int64 the token scored at each row
    cu_seqlens: torch.Tensor  # [2B+1] int32: sequence j's rows are index[cu_seqlens[j]:cu_seqlens[j+1]]
    loss: dict[str, Any] | None = None  # fused_linear_rpo_loss's keywords; None: per-token log-probs only


# The attribute that marks a causal LM whose forward `install_head_forward` replaced: {"impl": the head's kernels,
# "previous": the replaced forward as a function of (module, ...), see `forward_function`}.
_HEAD_RECORD = "_rpo_fast_head"


def install_head_forward(model: torch.nn.Module, impl: str = "auto") -> None:
    """Makes `model(..., rpo_fast_head=HeadRequest(...))` run the fused head instead of returning logits.

    The backbone runs on the other keywords; then the head reads the request's rows of its last hidden states.
    With `request.loss` (the keywords of `rpo_fast.fused_linear_rpo_loss`: beta, ..., ref_logps, backward,
    pair_weight, nll_weight) the call returns that op's `RPOOutput` (for a MoE model with
    `config.output_router_logits`, its `loss` plus `router_aux_loss_coef` times the router load-balancing loss,
    as the model's own training forward adds them); without, the rows' log-probs [N] float32
    (`rpo_fast.linear_logprobs`). Differentiable either way, and computed inside forward: a DDP/FSDP wrapper
    sees the LM head used in the forward it wraps, which its gradient hooks and parameter gathering rely on.
    Without the keyword the model's previous forward runs. Installs on the unwrapped causal LM (the base model
    under PEFT) and marks it (`_HEAD_RECORD`); installing again only updates `impl` (the head's forward kernels)
    and leaves `forward` alone, since it may have been wrapped since (accelerate's autocast and fp32-output
    wrapper, which calls this forward inside it: replacing it would run a bf16 Trainer's model in fp32).
    """
    check_choice("impl", impl, IMPLS)
    target = _causal_lm(model)
    logit_scale_of(target.config)  # validate the head (softcapping, a PEFT adapter on it) at install time
    lm_head_of(target)
    record = getattr(target, _HEAD_RECORD, None)
    if record is not None:
        record["impl"] = impl
        return

    @functools.wraps(type(target).forward)  # generate() validates its kwargs against the original signature
    def _rpo_fast_forward(self, *args, rpo_fast_head: HeadRequest | None = None, **kwargs):
        record = getattr(self, _HEAD_RECORD)  # self's own (a deepcopy has its own copy), as is `previous`'s self
        if rpo_fast_head is None:
            return record["previous"](self, *args, **kwargs)
        impl = record["impl"]
        kwargs["use_cache"] = False  # with the cache on, transformers ignores packed position_ids
        with_aux = rpo_fast_head.loss is not None and wants_router_logits(self.config)
        if with_aux:  # a MoE model's training loss includes its router load-balancing loss
            kwargs.setdefault("output_router_logits", True)
        backbone_out = self.base_model(*args, **kwargs)
        hidden = backbone_out.last_hidden_state
        weight, bias, scale = head_of(self)
        request = _on_device(rpo_fast_head, weight.device)
        rows = hidden.to(weight.device).flatten(0, 1)[request.index]
        rows, weight, bias = prepare_head_inputs(rows, weight, bias, scale=scale)
        record["compute_dtype"] = rows.dtype  # for check_packed_layout's bounds
        if request.loss is None:
            return head_logprobs(rows, weight, bias, request.targets, impl=impl)
        out = head_rpo_loss(rows, weight, bias, request.targets, request.cu_seqlens, impl=impl, **request.loss)
        if with_aux and kwargs.get("output_router_logits"):
            aux_loss, coef = router_aux_loss(self.config, backbone_out.router_logits, kwargs.get("attention_mask"))
            out = out._replace(loss=out.loss + coef * aux_loss.to(out.loss.device))
        return out

    setattr(target, _HEAD_RECORD, {"impl": impl, "previous": forward_function(target)})
    target.forward = types.MethodType(_rpo_fast_forward, target)


def _on_device(request: HeadRequest, device: torch.device) -> HeadRequest:
    def move(value):
        return value.to(device) if isinstance(value, torch.Tensor) else value

    loss = None if request.loss is None else {k: move(v) for k, v in request.loss.items()}
    return HeadRequest(*(move(t) for t in request[:3]), loss=loss)


def _is_installed(model: torch.nn.Module) -> bool:
    # The mark, not the forward: wrappers installed later (accelerate's) hide the function behind their own.
    return getattr(_causal_lm(model), _HEAD_RECORD, None) is not None


def _check_batch(inputs: dict[str, Any]) -> tuple[int, int]:
    for key in ("input_ids", "attention_mask", "labels"):
        if key not in inputs:
            raise ValueError(f"inputs: expected keys input_ids, attention_mask, labels ([2B, T] each), "
                             f"missing {key!r} (got {sorted(inputs)})")
    shape = tuple(inputs["input_ids"].shape)
    if len(shape) != 2 or shape[0] < 2 or shape[0] % 2:
        raise ValueError(f"input_ids: expected [2B, T] with an even number (>= 2) of rows, got {shape}")
    for key in ("attention_mask", "labels"):
        if tuple(inputs[key].shape) != shape:
            raise ValueError(f"{key}: expected shape {shape} like input_ids, got {tuple(inputs[key].shape)}")
    check_no_label_under_padding(inputs["labels"], inputs["attention_mask"])  # every layout, as packing does
    return shape


def _next_token_labels(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[R, T]: at position t the label that position t predicts (labels[:, t + 1]), -100 where t scores nothing
    (the predicting position must be a real token)."""
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    return shifted.masked_fill(~attention_mask.bool(), -100)


def chosen_token_count(inputs: dict[str, Any]) -> torch.Tensor:
    """The scored tokens of a padded batch's chosen rows (int64 scalar): `sum(RPOOutput.chosen_token_counts)`
    of every layout, computed without running the model."""
    n_pairs = inputs["labels"].shape[0] // 2
    return (_next_token_labels(inputs["labels"], inputs["attention_mask"])[:n_pairs] != -100).sum()


_UNSHARED_WARNINGS: "weakref.WeakKeyDictionary[torch.nn.Module, set[str]]" = weakref.WeakKeyDictionary()


def _shared_prompt_batch(model: torch.nn.Module, input_ids, attention_mask, labels):
    """The shared-prompt PackedBatch of a padded batch, or None (unshared) when the model or the batch cannot."""
    from ..modeling import shared_prompt_unsupported
    from ..packing import pack_pairs

    causal_lm = _causal_lm(model)
    reason = shared_prompt_unsupported(causal_lm)
    if reason is not None:
        # Once per model and reason: a PEFT model's reference and policy forwards both come here every step.
        warned = _UNSHARED_WARNINGS.setdefault(causal_lm, set())
        if reason not in warned:
            warned.add(reason)
            warnings.warn(f"share_prompt: packing unshared: {reason}", stacklevel=5)
        return None
    examples = pairs_from_padded(input_ids, attention_mask, labels)
    return None if examples is None else pack_pairs(examples, share_prompt=True).to(input_ids.device)


def _on_packed_attention(model: torch.nn.Module) -> bool:
    from ..attention import ATTN_IMPLEMENTATION

    return getattr(_causal_lm(model).config, "_attn_implementation", None) == ATTN_IMPLEMENTATION


def head_layout(model: torch.nn.Module, inputs: dict[str, Any], *, packed: bool = False,
                share_prompt: bool = False) -> tuple[dict[str, Any], HeadRequest]:
    """(the backbone's keyword arguments, the head's rows) of a padded preference batch (`sequence_logps`'s
    arguments): padded rows, one packed row, or one shared-prompt row where `model` and the batch allow it.

    A model on rpo_fast's packed attention is always packed (unshared where `packed=False`): transformers builds
    no attention mask for that attention, which reads sequence boundaries from a packed row only, so padded
    rows would attend to their padding (left padding: every real token would see the pads before it)."""
    input_ids, attention_mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    if not packed and _on_packed_attention(model):
        packed, share_prompt = True, False
    shared = _shared_prompt_batch(model, input_ids, attention_mask, labels) if packed and share_prompt else None
    if shared is not None:
        return ({"input_ids": shared.input_ids, "position_ids": shared.position_ids, **shared.attention_kwargs()},
                HeadRequest(shared.response_index, shared.targets, shared.response_cu_seqlens))
    if packed:
        p = pack_padded_pairs(input_ids, attention_mask, labels)
        return ({"input_ids": p.input_ids, "position_ids": p.position_ids},
                HeadRequest(p.response_index, p.targets, p.response_cu_seqlens))
    return _padded_layout(input_ids, attention_mask, labels)


def _padded_layout(input_ids, attention_mask, labels) -> tuple[dict[str, Any], HeadRequest]:
    next_labels = _next_token_labels(labels, attention_mask)
    scored = next_labels != -100
    cu_seqlens = torch.zeros(labels.shape[0] + 1, dtype=torch.int32, device=labels.device)
    cu_seqlens[1:] = scored.sum(1).cumsum(0)
    position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # right or left padding
    return ({"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids},
            HeadRequest(scored.flatten().nonzero().squeeze(1), next_labels[scored], cu_seqlens))


# check_packed_layout's bounds on |packed - padded| per-token log-probs (nats), by the head's compute dtype. Measured on
# tiny random models, first batch: float32 0 to 5e-7 where the attention restarts at position_ids (Llama, Qwen2,
# GPT-2, NeoX, Falcon, Phi, Gemma 3), mean 4e-4 to 2e-2 where it does not (Bloom, OPT, MPT, Mamba); bf16 noise
# up to 2e-3 (mean 3e-4) where it does, so in 16 bits only a larger leak is caught.
PACKING_BOUNDS = {torch.float32: (1e-4, 1e-2), "16-bit": (3e-2, 1.0)}  # (mean, max)


def check_packed_layout(model: torch.nn.Module, inputs: dict[str, Any], model_inputs: dict[str, Any],
                        request: HeadRequest) -> bool:
    """Refuses a model whose attention reads a packed row as one sequence (OPT, MPT, Bloom, Mamba: they ignore
    the restarting position_ids), from the batch itself: the per-token log-probs of its packed layout
    (`model_inputs`, `request`) against those of the same sequences right-padded, where no real token comes
    after padding, so every causal model computes them exactly (on rpo_fast's packed attention, which runs a
    padded batch as plain causal attention with no sliding window, one sequence per call instead). No gradient,
    no dropout (eval mode, restored after); through `model` as the loss calls it (its wrappers, autocast
    included).

    Returns:
        Whether it compared anything (False for a batch without a scored token).

    Raises:
        ValueError: naming the model type, when the two differ beyond `PACKING_BOUNDS`.
    """
    mask = inputs["attention_mask"].bool()
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # each row's attended tokens first
    right = {key: inputs[key].gather(1, order) for key in ("input_ids", "attention_mask", "labels")}
    padded_inputs, padded_request = _padded_layout(right["input_ids"], right["attention_mask"], right["labels"])
    if not torch.equal(padded_request.cu_seqlens.cpu(), request.cu_seqlens.cpu()) or request.targets.numel() == 0:
        return False  # not the same scored tokens (cannot happen for a batch _check_batch passed), or none
    record = getattr(_causal_lm(model), _HEAD_RECORD)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()  # no dropout: the two passes must differ by the layout alone
    try:
        with torch.no_grad():
            packed_lp = model(**model_inputs, rpo_fast_head=request._replace(loss=None))
            if _on_packed_attention(model):
                lengths = right["attention_mask"].sum(1).tolist()
                padded_lp = torch.cat([model(**layout[0], rpo_fast_head=layout[1]) for layout in (
                    _padded_layout(*(right[key][j:j + 1, :n] for key in ("input_ids", "attention_mask", "labels")))
                    for j, n in enumerate(lengths))])
            else:
                padded_lp = model(**padded_inputs, rpo_fast_head=padded_request)
    finally:
        for module, training in modes:
            module.training = training
    diff = (packed_lp.float() - padded_lp.float().to(packed_lp.device)).abs()
    mean_bound, largest_bound = PACKING_BOUNDS.get(record.get("compute_dtype"), PACKING_BOUNDS["16-bit"])
    mean, largest = float(diff.mean()), float(diff.max())
    if mean > mean_bound or largest > largest_bound:
        config = _causal_lm(model).config
        raise ValueError(f"packed: expected a model whose attention keeps packed sequences apart (transformers' "
                         f"eager/sdpa/flash read the restarting position_ids), got {config.model_type!r} "
                         f"({type(_causal_lm(model)).__name__}, attention {config._attn_implementation!r}), whose "
                         f"packed log-probs differ from its padded ones by {mean:.3g} nats per token on average "
                         f"(largest {largest:.3g}) on this batch: it lets a sequence see the ones before it; use "
                         f"packed=False (or check_packing=False, if you know the model keeps them apart and the "
                         f"difference is rounding: the bounds are {mean_bound:g} mean, {largest_bound:g} largest)")
    return True


def _run_head(model: torch.nn.Module, inputs: dict[str, Any], loss: dict[str, Any] | None, *, packed: bool,
              impl: str, share_prompt: bool, check_packing: bool = True):
    """(the installed forward's result, its HeadRequest) on a padded batch that `_check_batch` passed; installs
    the forward on first use, and checks a packed layout once per model (`check_packed_layout`)."""
    if not _is_installed(model):
        install_head_forward(model, impl)
    model_inputs, request = head_layout(model, inputs, packed=packed, share_prompt=share_prompt)
    record = getattr(_causal_lm(model), _HEAD_RECORD)
    if check_packing and "attention_mask" not in model_inputs and not record.get("packing_checked"):
        record["packing_checked"] = check_packed_layout(model, inputs, model_inputs, request)
    return model(**model_inputs, rpo_fast_head=request._replace(loss=loss)), request


def sequence_logps(model: torch.nn.Module, inputs: dict[str, Any], *, packed: bool = False,
                   impl: str = "auto", share_prompt: bool = False,
                   check_packing: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of every row of a padded preference batch, through the fused head.

    For the reference, evaluation and precomputed columns: differentiable (`rpo_fast.linear_logprobs`,
    recompute backward), but `rpo_compute_loss` trains through the fused loss instead.

    Args:
        model: a causal LM (possibly PEFT-, DDP- or compile-wrapped); the head forward is installed on
            first use. Runs with the model's current grad mode and adapters.
        inputs: input_ids, attention_mask, labels [2B, T] (module docstring).
        packed, share_prompt: drop the padding; then pack each pair's prompt once where possible (module docstring).
        check_packing: on the first packed batch of each model, compare its packed and padded log-probs and
            refuse a model whose attention does not keep packed sequences apart (`check_packed_layout`).

    Returns:
        (logps [2B] float32, token_counts [2B] float32): `s_j` and `n_j` of the formulas in `rpo_fast.loss`.
    """
    _check_batch(inputs)
    return _sequence_logps(model, inputs, packed=packed, impl=impl, share_prompt=share_prompt,
                           check_packing=check_packing)


def _sequence_logps(model: torch.nn.Module, inputs: dict[str, Any], **layout) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` of a batch that `_check_batch` passed (`rpo_compute_loss` checks its batch once)."""
    lp, request = _run_head(model, inputs, None, **layout)
    lengths = request.cu_seqlens.diff().long()
    return segment_sum(lp, lengths), lengths.float().to(lp.device)


def rpo_compute_loss(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    *,
    ref_model: torch.nn.Module | None = None,
    beta: float = 0.1,
    alpha: float = 1.0,
    sft_norm: str = "token_mean",
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    average_log_prob: bool = False,
    packed: bool = False,
    share_prompt: bool = False,
    reference_free: bool = False,
    impl: str = "auto",
    head_backward: str = "auto",
    head_chunk_tokens: int | None = None,
    pair_weight: float = 1.0,
    nll_weight: float = 1.0,
    check_packing: bool = True,
) -> RPOOutput:
    """The RPO loss of one padded preference batch; a `compute_loss` body for any HF-style trainer.

    Reference, first that applies: `inputs["ref_chosen_logps"]` / `["ref_rejected_logps"]` (precomputed,
    [B] each); `ref_model` (no grad); a PEFT `model` with its adapter disabled; none if `reference_free`.
    The reference runs first: its log-probs are an input of the policy's `rpo_fast.fused_linear_rpo_loss`.

    Args:
        head_backward: `fused_linear_rpo_loss`'s `backward`. "auto" (with grad mode on, bf16 or fp32) forms the
            gradient in the forward, and then only `loss` is differentiable (the other fields are metrics);
            "recompute" (also "auto"'s choice for fp16) keeps every field differentiable, at one more head GEMM
            per token.
        head_chunk_tokens: its `chunk_tokens` (rows per forward-time-gradient chunk; None: a logits budget).
        pair_weight, nll_weight: `loss = pair_weight * pref_loss + nll_weight * alpha * nll` (a trainer's
            micro-batch weights, which must be known in forward); `pref_loss` and `nll` are unweighted.
        check_packing: `sequence_logps`'.

    Returns:
        `rpo_fast.RPOOutput` (loss, pref_loss, nll, per-pair logps, rewards, token counts).

    Raises:
        ValueError: on a malformed batch, bad options, or no reference without `reference_free=True`.
    """
    n_seqs = _check_batch(inputs)[0]
    layout = dict(packed=packed, impl=impl, share_prompt=share_prompt, check_packing=check_packing)
    if "ref_chosen_logps" in inputs and "ref_rejected_logps" in inputs:
        ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float()
        if ref_logps.shape != (n_seqs,):
            raise ValueError(f"ref_chosen_logps/ref_rejected_logps: expected [B]=[{n_seqs // 2}] each, got "
                             f"{tuple(inputs['ref_chosen_logps'].shape)} and "
                             f"{tuple(inputs['ref_rejected_logps'].shape)}")
    elif ref_model is not None:
        with torch.no_grad():
            ref_logps = _sequence_logps(ref_model, inputs, **layout)[0]
    elif hasattr(_unwrap(model), "disable_adapter"):
        with torch.no_grad(), _unwrap(model).disable_adapter():
            ref_logps = _sequence_logps(model, inputs, **layout)[0]
    elif reference_free:
        ref_logps = None
    else:
        raise ValueError("reference: expected ref_chosen_logps/ref_rejected_logps in the batch, a ref_model, a PEFT "
                         "model (adapter disabled = reference) or reference_free=True, got none of them")
    loss = dict(ref_logps=ref_logps, beta=beta, alpha=alpha, sft_norm=sft_norm, loss_type=loss_type,
                label_smoothing=label_smoothing, average_log_prob=average_log_prob, backward=head_backward,
                chunk_tokens=head_chunk_tokens, pair_weight=pair_weight, nll_weight=nll_weight)
    return _run_head(model, inputs, loss, **layout)[0]


@dataclass
class PreferenceCollator:
    """Pads `{"prompt_ids", "chosen_ids", "rejected_ids"[, "ref_chosen_logps", "ref_rejected_logps"]}` examples
    into the batch `rpo_compute_loss` reads: input_ids / attention_mask / labels [2B, T], chosen rows first.
    The reference columns come with every row of a batch or with none (ValueError otherwise)."""

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        check_choice("padding_side", self.padding_side, ("right", "left"))
        reference = _check_examples(examples)
        seqs, labels = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                prompt, response = list(ex["prompt_ids"]), list(ex[key])
                seqs.append(prompt + response)
                labels.append([-100] * len(prompt) + response)
        width = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {name: torch.full((len(seqs), width), fill, dtype=torch.long)
                 for name, fill in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("labels", -100))}
        for j, (seq, lab) in enumerate(zip(seqs, labels)):
            cols = slice(0, len(seq)) if self.padding_side == "right" else slice(width - len(seq), width)
            batch["input_ids"][j, cols] = torch.tensor(seq)
            batch["attention_mask"][j, cols] = 1
            batch["labels"][j, cols] = torch.tensor(lab)
        for key in reference:
            batch[key] = torch.tensor([float(ex[key]) for ex in examples])
        return batch


_TOKEN_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
_REFERENCE_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def _check_examples(examples: list[dict[str, Any]]) -> tuple[str, ...]:
    """The reference columns the batch carries (both or none), after checking that every row has the token keys
    and that all rows or none have both reference columns.

    Raises:
        ValueError: naming the first row that lacks a key (and what it holds), or the rows with and without the
            reference columns.
    """
    for i, ex in enumerate(examples):
        missing = [key for key in _TOKEN_KEYS if key not in ex]
        if missing:
            hint = (" (text rows, as TRL's datasets hold: tokenize prompt, chosen and rejected into token-id lists "
                    "first)" if {"prompt", "chosen", "rejected"} & set(ex) else "")
            raise ValueError(f"examples: expected keys {list(_TOKEN_KEYS)} (token-id lists) in every row, row {i} "
                             f"lacks {missing}, got keys {sorted(ex)}{hint}")
    carried = [[key for key in _REFERENCE_KEYS if key in ex] for ex in examples]
    if any(len(keys) == 1 for keys in carried):
        i = next(i for i, keys in enumerate(carried) if len(keys) == 1)
        raise ValueError(f"examples: expected both {list(_REFERENCE_KEYS)} or neither in a row, row {i} has only "
                         f"{carried[i]}")
    with_reference = [i for i, keys in enumerate(carried) if keys]
    if with_reference and len(with_reference) != len(examples):
        without = [i for i, keys in enumerate(carried) if not keys]
        raise ValueError(f"examples: expected {list(_REFERENCE_KEYS)} in all rows of a batch or in none, got them in "
                         f"rows {with_reference} and not in rows {without}")
    return _REFERENCE_KEYS if with_reference else ()


def _check_separate_reference(model: torch.nn.Module, ref_model: torch.nn.Module) -> None:
    """Refuses a ref_model that shares a parameter (the object or its memory) with the policy: the mixin freezes
    the reference, which would freeze the policy too (ref_model=model crashed at the first backward with
    "element 0 of tensors does not require grad")."""
    policy = {}
    for name, p in _unwrap(model).named_parameters():
        policy[id(p)] = name
        if p.data_ptr():
            policy[("ptr", p.data_ptr())] = name
    for name, p in _unwrap(ref_model).named_parameters():
        shared = policy.get(id(p)) or (policy.get(("ptr", p.data_ptr())) if p.data_ptr() else None)
        if shared is not None:
            what = "the policy itself" if _unwrap(ref_model) is _unwrap(model) else "a model sharing its parameters"
            raise ValueError(f"ref_model: expected a frozen copy of the policy, separate from model, got {what} "
                             f"(its {name!r} is the policy's {shared!r}; the mixin freezes ref_model, which would "
                             "freeze the policy); pass copy.deepcopy(model) before training, or no ref_model for a "
                             "PEFT model (its disabled adapter is the reference)")


def _means(metrics: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    return {name: sum(s for s, _ in parts) / sum(c for _, c in parts) for name, parts in metrics.items() if parts}


class RPOTrainerMixin:
    """Adds the RPO loss to `transformers.Trainer`: `class MyTrainer(RPOTrainerMixin, Trainer)`.

    Extra constructor keywords: `ref_model` (frozen reference; optional with PEFT or precomputed
    `ref_*_logps` columns) and `rpo_args: RPOArguments` (beta, alpha, sft_norm, ...). `compute_metrics` is
    refused (ValueError): there are no predictions to pass it; evaluate() returns the RPO metrics. `compute_loss`
    returns `rpo_compute_loss(...).loss`, a per-micro-batch mean (the Trainer divides it by the gradient
    accumulation steps); with `sft_norm="token_mean"` the NLL part is weighted (`nll_weight`) so that the step
    optimizes the token mean over all its chosen tokens, across micro-batches and processes (TRL and Liger
    average per micro-batch). Logs TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies,
    rewards/margins, logps/chosen, logps/rejected, plus nll (the step's NLL: with "token_mean", the token mean
    over the whole step, as optimized) and pref_loss. A MoE model with
    `output_router_logits` adds its router load-balancing loss (times `router_aux_loss_coef`), as its own forward
    and TRL do. Formula: the module docstring;
    with the default `sft_norm="token_mean"` it is TRL's `loss_type=["sigmoid", "sft"]`,
    `loss_weights=[1, alpha]` (with `label_smoothing=0`: TRL 1.16 does not smooth its "sigmoid" loss, this does).
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args, ref_model: torch.nn.Module | None = None, rpo_args: RPOArguments | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if self.compute_metrics is not None:
            # prediction_step has no logits or predictions to give it (a preference batch scores sequences), so the
            # Trainer would never call it: refused rather than silently skipped.
            raise ValueError(f"compute_metrics: expected None (RPOTrainerMixin's evaluation returns the loss and the "
                             f"RPO metrics, eval_rewards/margins etc., and no predictions to pass it), got "
                             f"{self.compute_metrics!r}")
        # compute_loss returns a per-micro-batch mean that the Trainer must divide by the accumulation steps:
        # `loss_is_scaled_for_ga = False` says so to a Trainer that reads that attribute (5.24 does; 5.17 has none
        # and divides only when the model does not take loss kwargs, which is true here: the model never sees
        # num_items_in_batch).
        self.model_accepts_loss_kwargs = False
        self.rpo_args = rpo_args or RPOArguments()
        install_head_forward(self.model, self.rpo_args.impl)
        self.ref_model = None
        if ref_model is not None:
            _check_separate_reference(self.model, ref_model)  # before freezing it, which would freeze the policy
            ref_model.eval().requires_grad_(False)
            install_head_forward(ref_model, self.rpo_args.impl)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self._rpo_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "attention_mask", "labels", "prompt_ids", "chosen_ids",
                                       "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """With sft_norm="token_mean": the chosen response tokens of the whole accumulation window, summed over
        processes, so `compute_loss` can weight each micro-batch's NLL by its share of them. (transformers'
        own count, every label token, would include the rejected responses.)"""
        if self.rpo_args.sft_norm != "token_mean":
            return super()._get_num_items_in_batch(batch_samples, device)
        count = sum(chosen_token_count(b) for b in batch_samples)
        count = torch.as_tensor(count, device=device).reshape(1)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count)
        return count.sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        nll_weight = 1.0
        if self.rpo_args.sft_norm == "token_mean" and num_items_in_batch is not None and model.training:
            # The Trainer divides by the accumulation steps and DDP averages over processes: weighting alpha * nll
            # by this micro-batch's share of the window's chosen tokens makes the step's NLL their token mean,
            # not a mean of per-micro-batch means. The weight enters the fused loss, whose gradient is formed in
            # forward.
            nll_weight = float(chosen_token_count(inputs) * self.current_gradient_accumulation_steps
                               * self.accelerator.num_processes / num_items_in_batch)
        out = rpo_compute_loss(model, inputs, ref_model=self.ref_model, nll_weight=nll_weight,
                               **asdict(self.rpo_args))
        self._record_metrics(out, nll_weight)
        return (out.loss, out) if return_outputs else out.loss

    def _record_metrics(self, out: RPOOutput, nll_weight: float) -> None:
        """Appends (sum, count) per metric: in training each micro-batch's mean with count 1 (the logs average the
        micro-batches, as TRL does); in evaluation sums over the pairs and the pair count, so that the eval set's
        metrics are pair means, weighted as eval_loss is."""
        training = self.model.training
        metrics = self._rpo_metrics["train" if training else "eval"]
        margins = out.chosen_rewards - out.rejected_rewards
        pending = []  # (name, sum, count), device scalars among them read back at once (each read waits for a GPU)
        for name, value in (("rewards/chosen", out.chosen_rewards), ("rewards/rejected", out.rejected_rewards),
                            ("rewards/accuracies", (margins > 0).float()), ("rewards/margins", margins),
                            ("logps/chosen", out.chosen_logps.detach()),
                            ("logps/rejected", out.rejected_logps.detach())):
            value = self.accelerator.gather_for_metrics(value)
            pending.append((name, value.mean(), 1) if training else (name, value.sum(), value.numel()))
        n_pairs = float(out.chosen_rewards.shape[0])
        # nll times its weight: averaged over the step's micro-batches and processes (as the logs do) that is the
        # step's token mean, the NLL the step optimizes (nll_weight is 1 in evaluation)
        for name, value in (("nll", out.nll.detach() * nll_weight), ("pref_loss", out.pref_loss.detach())):
            if training:
                pending.append((name, self.accelerator.gather_for_metrics(value[None]).mean(), 1))
            else:  # per batch and process: weighted by its pairs
                total, pairs = self.accelerator.gather(torch.stack([value.float() * n_pairs,
                                                                    value.new_tensor(n_pairs, dtype=torch.float32)])
                                                       [None]).sum(0)
                pending.append((name, total, pairs))
        scalars = [t for entry in pending for t in entry[1:] if isinstance(t, torch.Tensor)]
        read = iter(torch.stack([t.double() for t in scalars]).tolist())  # float32 values, exactly
        for name, *entry in pending:
            metrics[name].append(tuple(next(read) if isinstance(t, torch.Tensor) else t for t in entry))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Preference batches have labels but no logits to return: always the loss only.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Transformers' loop (evaluate() and predict()), plus the RPO metrics of this loop alone: pair means over
        the whole set, named with the loop's `metric_key_prefix` (eval_rewards/margins, test_rewards/margins)."""
        metrics = self._rpo_metrics["eval"]
        metrics.clear()  # nothing left from an interrupted loop
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                              ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
            output.metrics.update({f"{metric_key_prefix}_{name}": value
                                   for name, value in _means(metrics).items()})
        finally:
            metrics.clear()
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:  # evaluation's metrics come with the loop's output (evaluation_loop)
            logs.update(_means(self._rpo_metrics["train"]))
            self._rpo_metrics["train"].clear()
        super().log(logs, start_time)
