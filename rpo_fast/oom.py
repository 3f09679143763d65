"""Turning a CUDA out-of-memory error in training into a report a person can act on: where it happened,
how big the batch was, what the memory planner predicts, and what to change."""
from __future__ import annotations

import dataclasses

import torch

from .config import TrainConfig
from .memory_plan import (World, alternatives, plan_for_train_config, single_changes, train_config_keys,
                          train_config_plan_options)

GiB = 2**30


class TrainingOutOfMemoryError(RuntimeError):
    """A CUDA out-of-memory error in a training step, with the step, the batch and the planner's advice."""


def _planned_peak(model_config, config: TrainConfig, token_budget: int, world: World) -> float | None:
    """The planner's predicted peak (bytes) for these settings at `token_budget`, or None if it cannot plan."""
    try:
        return plan_for_train_config(dataclasses.replace(config, token_budget=token_budget), model=model_config,
                                     world=world).peak_bytes
    except Exception:  # an architecture or option the planner does not model: advise without numbers
        return None


def out_of_memory_message(config: TrainConfig, step: int, pairs: int, tokens: int, response_tokens: int,
                          model_config, device_bytes: int | None, world: World = World()) -> str:
    """What went wrong in a micro-batch's forward/backward and what to change, in one paragraph."""
    lines = [f"CUDA out of memory at step {step}, in a micro-batch of {pairs} pairs = {tokens} packed tokens "
             f"({response_tokens} scored) with token_budget={config.token_budget}."]
    lines += _prediction_and_advice(config, model_config, device_bytes, world, batch_advice=True)
    return " ".join(lines)


def update_out_of_memory_message(config: TrainConfig, step: int, model_config, device_bytes: int | None,
                                 world: World = World()) -> str:
    """What went wrong in a step's gradient clipping or optimizer step and what to change, in one paragraph.
    The batch does not matter there: the optimizer's states are created at the first step, and its update
    may need a gradient-sized temporary."""
    lines = [f"CUDA out of memory at step {step}, in the optimizer update (clipping and {config.optimizer!r} "
             "step, after the step's backward; the first step also creates the optimizer's states)."]
    lines += _prediction_and_advice(config, model_config, device_bytes, world, batch_advice=False)
    return " ".join(lines)


def _prediction_and_advice(config: TrainConfig, model_config, device_bytes: int | None, world: World,
                           batch_advice: bool) -> list[str]:
    lines = []
    peak = _planned_peak(model_config, config, config.token_budget, world)
    if peak is not None:
        where = f" of the device's {device_bytes / GiB:.1f} GiB" if device_bytes else ""
        lines.append(f"The memory planner predicts a peak of {peak / GiB:.1f} GiB{where} for these settings.")
    advice = []
    if batch_advice:
        smaller = max(2, config.token_budget // 2)
        smaller_peak = _planned_peak(model_config, config, smaller, world)
        advice.append(f"lower token_budget (e.g. --token_budget={smaller}"
                      + (f": {smaller_peak / GiB:.1f} GiB predicted" if smaller_peak is not None else "")
                      + "; raise gradient_accumulation_steps to keep the batch)")
    # The micro-batch's size is the line above; the optimizer update depends neither on it nor on checkpointing.
    skip = {"tokens_per_micro_batch", "micro_batch_pairs"} | (set() if batch_advice else {"gradient_checkpointing"})
    advice += _single_changes(config, model_config, device_bytes, world, peak, skip)
    if advice:
        lines.append("To fit: " + "; ".join(advice) + ".")
    lines.append("`rpo-fast plan-memory --config CONFIG` lists the options.")
    return lines


def _single_changes(config: TrainConfig, model_config, device_bytes: int | None, world: World, peak: int | None,
                    skip: set[str]) -> list[str]:
    """The planner's single changes (`memory_plan.alternatives`, less those of the options in `skip`), each as the
    train overrides that make it and its predicted peak: those that fit on the device, or, when none does or its
    size is unknown, those that lower the peak. Without a plan, every change, without numbers."""
    options = train_config_plan_options(config, "cuda", world)
    try:
        listed = [alt for alt in alternatives(model_config, device_bytes or 0, **options) if not skip & set(alt.change)]
    except Exception:  # an architecture or option the planner does not model
        listed = None
    if peak is None or listed is None:
        return [_overrides(config, change) for _, change in single_changes(options) if not skip & set(change)]
    lower = [alt for alt in listed if alt.plan.peak_bytes < peak]
    fitting = [alt for alt in lower if device_bytes and alt.plan.fits(device_bytes)]
    return [f"{_overrides(config, alt.change)}: {alt.plan.peak_bytes / GiB:.1f} GiB predicted"
            for alt in fitting or lower]


def _overrides(config: TrainConfig, change: dict) -> str:
    """`change` (plan_memory options) as the `--key=value` train overrides that make it, less those already set."""
    keys = {key: value for key, value in train_config_keys(change).items() if getattr(config, key) != value}
    return " ".join(f"--{key}={str(value).lower() if isinstance(value, bool) else value}"
                    for key, value in keys.items())


def device_memory_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory
