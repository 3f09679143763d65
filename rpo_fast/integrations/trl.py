"""TRL: run `trl.DPOTrainer` with rpo_fast's fused linear -> log-prob head (tested with trl==1.16.0).

TRL's DPOTrainer gets every log-prob from one place: `model(..., labels=labels, fused_lm_head=True)`, a
forward that `trl.trainer.utils.add_fused_lm_head` installs on the policy (the base model under PEFT) and
on the reference model. That call is the only part that touches the vocabulary, so it is the only part
replaced here. The rpo_fast forward runs the backbone (no lm_head), keeps the positions whose next token is
a completion token, and scores them with `rpo_fast.linear_logprobs`, which never holds more than a
[chunk, V] tile of logits (the Triton kernels on CUDA, the chunked PyTorch path on CPU). Everything else
is TRL's own code, unchanged: its loss types and `loss_weights`, `ld_alpha`, f-divergences, WPO weights,
`precompute_ref_log_probs`, the reference model or PEFT adapter as reference, and the logged metrics.

RPO as TRL expresses it::

    DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, alpha], beta=beta)
    loss = mean_i -log sig(z_i) + alpha * NLL,  NLL = -(sum_i s_i) / (sum_i n_i)

TRL's `"sft"` term is the **token_mean** normalization (rpo_fast `sft_norm="token_mean"`, Liger's
`compute_nll_loss`): the chosen completions' summed log-probs divided by their total token count. `alpha`
is the ratio `loss_weights[1] / loss_weights[0]`. The paper's main form, `sft_norm="sum"` with
`alpha = eta * beta`, has no exact TRL equivalent (its weight per pair scales with the completion length);
use `rpo_fast.integrations.hf_trainer` or `rpo_fast.fused_linear_rpo_loss` for it. TRL 1.16 applies
`label_smoothing` only to its "robust", "exo_pair", "aot" and "aot_unpaired" losses, not to "sigmoid";
that is kept as is.

The statistics TRL logs besides log-probs (`entropy`, `mean_token_accuracy`, and `log_sum_sq_probs` for
WPO weights) need the whole vocabulary row; they come from a no-grad pass over chunks of at most
`metrics_chunk_size` rows (`token_metrics=False` skips it for entropy and token accuracy and drops those
two from the logs; `logits/*` stays exact at no cost).
"""
from __future__ import annotations

import functools
import types
import warnings

import torch

try:
    import trl
    from trl import DPOTrainer
    from trl.trainer import dpo_trainer as _trl_dpo
    from trl.trainer.utils import FusedCausalLMOutput
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("rpo_fast.integrations.trl needs TRL: pip install trl==1.16.0") from e

from ..checks import IMPLS, check_choice
from ._model import (forward_function, head_logprobs, head_of, head_statistics, lm_head_of, logit_scale_of,
                     prepare_head_inputs, router_aux_loss, wants_router_logits)

TESTED_TRL_VERSION = "1.16.0"
_TOKEN_METRICS = ("entropy", "mean_token_accuracy")  # the logged names of the entropy / is_top1 statistics
# The attribute that marks a model whose forward `install_fused_head` replaced: {"options": the head's options,
# "previous": the replaced forward as a function of (module, ...), see `_model.forward_function`}.
_FUSED_HEAD_RECORD = "_rpo_fast_fused_head"


def install_fused_head(
    model: torch.nn.Module,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
    *,
    impl: str = "auto",
    token_metrics: bool = True,
    metrics_chunk_size: int | None = None,
) -> None:
    """Drop-in for `trl.trainer.utils.add_fused_lm_head` (same positional arguments) on rpo_fast's op.

    After it, `model(..., labels=labels, fused_lm_head=True)` returns a `trl.trainer.utils.FusedCausalLMOutput`
    whose `log_probs` [batch, seq_len - 1] float32 hold `log p(labels[:, t+1] | tokens <= t)` (0 where the
    label is -100) and come from `rpo_fast.linear_logprobs`; the other requested fields (`outputs`) come
    from a no-grad chunked pass. Without `fused_lm_head=True` the model's previous forward runs, so
    generation is unchanged. Installing twice replaces the first installation's options.

    Args:
        model: a causal LM (`PreTrainedModel`); under PEFT, the base model (`peft_model.get_base_model()`).
        temperature: the logits are divided by it (DPO uses 1.0).
        cast_lm_head_to_fp32: score in float32 outside autocast.
        outputs: fields of `FusedCausalLMOutput` to fill, among "log_probs", "entropy", "mean_logits",
            "is_top1", "log_sum_sq_probs".
        impl: `rpo_fast.linear_logprobs` backend ("auto": Triton on CUDA, chunked PyTorch on CPU).
        token_metrics: compute "entropy" and "is_top1" when asked; if False they come back NaN / False.
        metrics_chunk_size: rows per chunk of the statistics pass (default: 128 MiB of fp32 logits).

    Raises:
        ValueError: for an unknown impl, a non-positive temperature, DeepSpeed ZeRO-3, or a model whose head
            rpo_fast cannot reproduce (final_logit_softcapping, a PEFT LoRA adapter on lm_head).
    """
    check_choice("impl", impl, IMPLS)
    if is_deepspeed_zero3_enabled():
        # The op's backward recomputes logits from lm_head.weight outside any module hook, where ZeRO-3 has
        # partitioned it to an empty tensor.
        raise ValueError("DeepSpeed: expected ZeRO stage <= 2 (rpo_fast's head reads lm_head.weight in backward, "
                         "where ZeRO-3 has partitioned it), got ZeRO-3")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    logit_scale_of(model.config)  # validate the head (softcapping, a PEFT adapter on it) at install time,
    lm_head_of(model)  # not at the first step
    stats_wanted = frozenset(outputs) - {"log_probs"}
    if not token_metrics:
        stats_wanted -= {"entropy", "is_top1"}
    options = {"temperature": temperature, "cast_lm_head_to_fp32": cast_lm_head_to_fp32, "outputs": tuple(outputs),
               "impl": impl, "stats_wanted": stats_wanted, "metrics_chunk_size": metrics_chunk_size}
    record = getattr(model, _FUSED_HEAD_RECORD, None)
    if record is not None:  # installed: new options, and the forward (maybe wrapped since) left as it is
        record["options"] = options
        return

    @functools.wraps(type(model).forward)
    def _rpo_fast_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                          num_items_in_batch=None, **kwargs):
        record = getattr(self, _FUSED_HEAD_RECORD)  # self's own (a deepcopy has its own copy)
        if not fused_lm_head:
            for key, value in (("labels", labels), ("shift_labels", shift_labels),
                               ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[key] = value
            return record["previous"](self, *args, **kwargs)

        options = record["options"]
        outputs, text_config = options["outputs"], self.config.get_text_config()
        kwargs["use_cache"] = False  # a training forward: no KV cache
        if wants_router_logits(text_config):
            kwargs.setdefault("output_router_logits", True)
        backbone_out = self.base_model(*args, **kwargs)
        if shift_labels is None:
            hidden, labels = backbone_out.last_hidden_state[:, :-1], labels[:, 1:]
        else:
            hidden, labels = backbone_out.last_hidden_state, shift_labels
        weight, bias, logit_scale = head_of(self)
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        # Only completion positions reach the head: [N_resp, H], not [batch * seq_len, H].
        rows, targets = hidden[mask], labels[mask]
        rows, weight, bias = prepare_head_inputs(rows, weight, bias, scale=logit_scale / options["temperature"],
                                                 cast_to_fp32=options["cast_lm_head_to_fp32"])
        lp = head_logprobs(rows, weight, bias, targets, impl=options["impl"])
        stats = head_statistics(rows, weight, bias, targets, options["stats_wanted"],
                                chunk_size=options["metrics_chunk_size"])
        # masked_scatter keeps an all-masked micro-batch connected to the graph (a differentiable zero).
        log_probs = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
        fields = {}
        for name in ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"):
            if name not in outputs:
                fields[name] = None
            elif name in stats:
                fields[name] = stats[name].new_zeros(mask.shape).masked_scatter(mask, stats[name])
            else:  # skipped with token_metrics=False
                fields[name] = (torch.zeros(mask.shape, dtype=torch.bool, device=mask.device) if name == "is_top1"
                                else torch.full(mask.shape, float("nan"), device=mask.device))
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / count
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss, coef = router_aux_loss(text_config, backbone_out.router_logits, kwargs.get("attention_mask"))
            loss = loss + coef * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=mask, aux_loss=aux_loss, **fields)

    setattr(model, _FUSED_HEAD_RECORD, {"options": options, "previous": forward_function(model)})
    model.forward = types.MethodType(_rpo_fast_forward, model)


def is_installed(model: torch.nn.Module) -> bool:
    """Whether `model.forward` is rpo_fast's fused head (on the base model under PEFT)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, _FUSED_HEAD_RECORD, None) is not None


def _requested_outputs(trainer) -> tuple[str, ...]:
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    return outputs + ("log_sum_sq_probs",) if getattr(trainer, "use_weighting", False) else outputs


class RPOFastDPOTrainer(DPOTrainer):
    """`trl.DPOTrainer` whose log-probs come from rpo_fast's fused head; every other line is TRL's.

    Same constructor as `DPOTrainer`, plus keyword-only `impl`, `token_metrics` and `metrics_chunk_size`
    (see `install_fused_head`). The head is installed while `DPOTrainer.__init__` runs, in place of TRL's
    `add_fused_lm_head`, so `precompute_ref_log_probs=True` is computed through it too. Losses, gradients
    and logged metrics match TRL's (fp32: to rounding); the [tokens, V] logits never exist.

    RPO (Liu et al., NeurIPS 2024) in TRL's terms: `loss_type=["sigmoid", "sft"]`,
    `loss_weights=[1.0, alpha]`, i.e. `mean_i -log sig(z_i) + alpha * NLL` with the **token_mean** SFT
    normalization `NLL = -(sum_i s_i) / (sum_i n_i)` over chosen completion tokens (see the module docstring).

    Reference: `ref_model` if given; else, for a PEFT model, the policy with its adapter disabled (or the
    frozen "ref" copy TRL makes of a pre-existing adapter); else precomputed log-probs with
    `precompute_ref_log_probs=True`. A full-fine-tuning policy passed as an instance needs `ref_model`
    (TRL reloads the reference from `model.config._name_or_path` otherwise).

    Example::

        from trl import DPOConfig
        from rpo_fast.integrations.trl import RPOFastDPOTrainer
        args = DPOConfig(output_dir="out", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.1)
        trainer = RPOFastDPOTrainer(model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
        trainer.train()
    """

    def __init__(self, *args, impl: str = "auto", token_metrics: bool = True, metrics_chunk_size: int | None = None,
                 **kwargs):
        check_choice("impl", impl, IMPLS)
        self._rpo_fast_options = {"impl": impl, "token_metrics": token_metrics,
                                  "metrics_chunk_size": metrics_chunk_size}
        replacement = functools.partial(install_fused_head, **self._rpo_fast_options)
        original = _trl_dpo.add_fused_lm_head
        _trl_dpo.add_fused_lm_head = replacement
        try:
            super().__init__(*args, **kwargs)
        finally:
            _trl_dpo.add_fused_lm_head = original
        if not is_installed(self.accelerator.unwrap_model(self.model)):  # a TRL that no longer calls the hook
            warnings.warn(f"RPOFastDPOTrainer: trl {trl.__version__} did not install the head through "
                          f"add_fused_lm_head (tested with {TESTED_TRL_VERSION}); patching after construction, so "
                          "precomputed reference log-probs, if any, came from TRL's head", stacklevel=2)
            _install_on_trainer(self, **self._rpo_fast_options)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not self._rpo_fast_options["token_metrics"]:
            for metrics in self._metrics.values():
                for name in _TOKEN_METRICS:
                    metrics.pop(name, None)
        super().log(logs, start_time)


def _install_on_trainer(trainer, **options) -> None:
    outputs = _requested_outputs(trainer)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    install_fused_head(policy.get_base_model() if hasattr(policy, "get_base_model") else policy,
                       outputs=outputs, **options)
    if trainer.ref_model is not None:
        ref_model = trainer.accelerator.unwrap_model(trainer.ref_model)
        prepared = getattr(ref_model, "_original_forward", None) is not None  # accelerate wrapped its forward
        before = ref_model.forward
        install_fused_head(ref_model, **options)
        if prepared and ref_model.forward is not before:
            _under_autocast(ref_model, trainer.accelerator)


def _under_autocast(model: torch.nn.Module, accelerator) -> None:
    """Runs `model.forward` (just installed) under `accelerator`'s autocast. DPOTrainer prepares its reference
    model in its constructor, where accelerate wraps the forward in its mixed-precision autocast; a head
    installed after that replaces the wrapper, and the reference would run in fp32 while the policy (prepared
    later, in train) runs in bf16: rewards of a policy equal to its reference would start away from 0."""
    inner = model.forward.__func__  # bound to `model` by install_fused_head; a deepcopy rebinds the method

    @functools.wraps(inner)
    def forward_under_autocast(self, *args, **kwargs):
        with accelerator.autocast():
            return inner(self, *args, **kwargs)

    model.forward = types.MethodType(forward_under_autocast, model)


def patch_dpo_trainer(trainer: DPOTrainer, *, impl: str = "auto", token_metrics: bool = True,
                      metrics_chunk_size: int | None = None) -> DPOTrainer:
    """Switches an already-built `trl.DPOTrainer` to rpo_fast's fused head, in place; returns it.

    Same effect as building `RPOFastDPOTrainer`, except that reference log-probs already precomputed by the
    constructor (`precompute_ref_log_probs=True`) stay as TRL's head computed them (equal to rounding).
    Formula: TRL's own, e.g. RPO = `loss_type=["sigmoid", "sft"]`, `loss_weights=[1.0, alpha]` with the
    token_mean SFT normalization (module docstring).
    """
    check_choice("impl", impl, IMPLS)
    _install_on_trainer(trainer, impl=impl, token_metrics=token_metrics, metrics_chunk_size=metrics_chunk_size)
    if not token_metrics:
        log = trainer.log

        def log_without_token_metrics(logs, start_time=None):
            for metrics in trainer._metrics.values():
                for name in _TOKEN_METRICS:
                    metrics.pop(name, None)
            return log(logs, start_time)

        trainer.log = log_without_token_metrics
    return trainer
