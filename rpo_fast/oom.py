"""Turning a CUDA out-of-memory error in training into a report a person can act on: where it happened,
how big the batch was, what the memory planner predicts, and what to change."""
from __future__ import annotations

import dataclasses

import torch

from .config import TrainConfig
from .memory_plan import World, plan_for_train_config

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
        if not config.gradient_checkpointing:
            advice.append("--gradient_checkpointing=true (one layer input saved per layer instead of all "
                          "activations)")
    if config.reference == "model":
        advice.append("--reference=cache (precomputed reference log-probs: no resident reference model)")
    if config.finetune != "lora" and config.optimizer in ("adamw", "adamw_bf16"):
        in_backward = ""
        if world.processes == 1:  # DDP and FSDP reduce gradients after the hooks that would step them
            accumulation = " --gradient_accumulation_steps=1" if config.gradient_accumulation_steps > 1 else ""
            in_backward = (f"--optimizer={config.optimizer}_in_backward --max_grad_norm=0{accumulation} (no full "
                           "gradients; no accumulation or clipping), ")
        advice.append(f"--optimizer=adamw_bf16_sr or adamw8bit (smaller optimizer states), {in_backward}"
                      "or --finetune=lora")
    if advice:
        lines.append("To fit: " + "; ".join(advice) + ".")
    lines.append("`rpo-fast plan-memory --config CONFIG` lists the options.")
    return lines


def device_memory_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory
