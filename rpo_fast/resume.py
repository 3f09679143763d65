"""Checkpoints of a training run, and resuming from one.

A checkpoint (its files and their atomic writing: rpo_fast/checkpoint.py) holds the weights, the optimizer and
scheduler state, every process's RNG states and the `TrainState` (the data position, counters, eval history).
Resuming restores all of them, and the trainer rebuilds the same batch plan, so a resumed run continues bit for
bit on the CPU. `check_resumable` and `check_same_data` refuse a checkpoint the run cannot continue exactly from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from . import checkpoint, metrics, modeling
from .config import TrainConfig, load_config, save_config


@dataclass
class TrainState:
    """Everything besides tensors that a checkpoint must restore."""

    step: int = 0  # optimizer steps attempted (skipped ones included): the data position
    epoch: int = 0
    step_in_epoch: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    # eval records, each with the `data_fingerprint` of the eval pairs it ran on (eval_file may change on resume)
    eval_history: list = field(default_factory=list)
    # ref_cache.data_fingerprint of the tokenized training pairs: --resume refuses other data at the same path
    # (None in checkpoints written before it was recorded: not checked then)
    data_fingerprint: str | None = None


def is_sharded(accelerator) -> bool:
    """True under FSDP: each rank holds a shard of the weights and optimizer state, so checkpoints write them
    with torch.distributed.checkpoint (`sharded/`) and the exported model is gathered on rank 0."""
    return accelerator.distributed_type == DistributedType.FSDP


def gathered_state_dict(accelerator, module: torch.nn.Module) -> dict | None:
    """Under FSDP the whole weights of `module` (a collective: every rank calls it) as CPU tensors on rank 0, for
    `save_pretrained` there; None otherwise (`save_pretrained` reads the module itself)."""
    if not is_sharded(accelerator):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A tied head comes back as a copy of the embedding; save_pretrained drops it only when storage is shared.
    tied = {n for n, _ in module.named_parameters(remove_duplicate=False)} - {n for n, _ in module.named_parameters()}
    return {name: tensor for name, tensor in weights.items() if name not in tied}


def save_checkpoint(accelerator, model, tokenizer, optimizer, scheduler, state: TrainState, config: TrainConfig,
                    logger: metrics.MetricsLogger | None = None):
    """Atomic checkpoint of the whole training state (see rpo_fast/checkpoint.py); flushes `logger`'s TensorBoard
    events first."""
    if accelerator.is_main_process:
        checkpoint.begin(config.output_dir, state.step)
    accelerator.wait_for_everyone()
    tmp = checkpoint.temp_dir(config.output_dir, state.step)
    checkpoint.save_torch(checkpoint.rng_state(), tmp / f"rng-rank{accelerator.process_index}.pt")
    policy = accelerator.unwrap_model(model).model
    if is_sharded(accelerator):  # every rank writes its shard
        checkpoint.save_sharded(model, optimizer.optimizer, tmp / checkpoint.SHARDED)
    weights = gathered_state_dict(accelerator, policy)
    if accelerator.is_main_process:
        modeling.save_pretrained(policy, tokenizer, tmp / "model", state_dict=weights)
        if not is_sharded(accelerator):
            checkpoint.save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
        checkpoint.save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
        checkpoint.write_json(vars(state), tmp / "trainer_state.json")
        save_config(config, tmp / "config.yaml")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if logger is not None:
            logger.flush()
        final = checkpoint.commit(tmp, state.step)
        checkpoint.prune(config.output_dir, config.keep_checkpoints, protect=final)
    accelerator.wait_for_everyone()


def saved_world_size(directory: Path) -> int:
    """How many processes wrote the checkpoint in `directory` (one RNG file each)."""
    return len(list(directory.glob("rng-rank*.pt")))


def check_resumable(directory: Path, accelerator, config: TrainConfig) -> None:
    """Refuses (with what to do) a checkpoint this run cannot continue exactly from.

    A step is `gradient_accumulation_steps x processes` micro-batches of a batch plan that depends on that
    product alone, so the data position means the same thing when the product is unchanged: the world size may
    then change (sharded state is resharded on load). A checkpoint of whole optimizer state (one process, DDP)
    cannot be spread over FSDP's shards; an FSDP checkpoint written before sharded checkpoints existed has no
    optimizer state at all.

    Raises:
        ValueError: naming the checkpoint, what it was written with, and how to continue.
    """
    from_weights = (f"or start a new run from its weights in another output_dir with --model={directory / 'model'} "
                    "--resume=false" if config.finetune == "full" else
                    "or start a new run (its model folder holds the LoRA adapter only, which --model cannot load)")
    sharded, whole = (directory / checkpoint.SHARDED).is_dir(), (directory / "optimizer.pt").is_file()
    if not sharded and not whole:
        raise ValueError(f"resume: {directory} has no optimizer state (written under FSDP before sharded "
                         f"checkpoints), so the run cannot continue exactly; {from_weights}")
    if whole and is_sharded(accelerator):
        raise ValueError(f"resume: {directory} holds whole optimizer state, written without FSDP, which cannot be "
                         f"split over FSDP's shards; resume it without FSDP (as it was written), {from_weights}")
    saved_world = saved_world_size(directory)
    saved_accumulation = load_config(directory / "config.yaml").gradient_accumulation_steps
    world = accelerator.num_processes
    if saved_world * saved_accumulation != world * config.gradient_accumulation_steps:
        per_step = saved_world * saved_accumulation
        hint = (f"gradient_accumulation_steps={per_step // world}" if per_step % world == 0 else
                f"a number of processes that divides {per_step}")
        raise ValueError(f"resume: {directory} was written by {saved_world} process(es) x gradient_accumulation_steps="
                         f"{saved_accumulation} = {per_step} micro-batches per step, this run has {world} x "
                         f"{config.gradient_accumulation_steps}: its batches and data position would not match; "
                         f"resume with {hint}, {from_weights}")


def set_scheduled_lr(scheduler) -> None:
    """Sets every param group's lr, and the scheduler's last lr, to this run's schedule at the scheduler's step
    (`scheduler`: a LambdaLR, as `build_optimizer` makes, after `load_state_dict`).

    A checkpoint's optimizer and scheduler state hold the lr the saved run's schedule gave for the next step
    (a finished cosine run's: 0), which the first resumed step would otherwise run at. The schedule's curve is
    this run's: the lambdas of transformers' schedules (functools.partial) save no attributes, so loading
    restores the step and base lrs only; a longer `max_steps` or `num_epochs` resumes on the new curve from the
    first resumed step. For an unchanged schedule the value set here is the one the scheduler computed before
    saving, bit for bit (`LambdaLR.step` computes `base_lr * lr_lambda(last_epoch)` too).
    """
    lrs = [base_lr * fn(scheduler.last_epoch) for fn, base_lr in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # what get_last_lr() returns


def load_checkpoint(directory: Path, accelerator, model, optimizer, scheduler, config: TrainConfig) -> TrainState:
    """Restores weights, optimizer, scheduler and this process's RNG state; returns the saved TrainState.

    The learning rate of the next step is this run's schedule's at the saved step (`set_scheduled_lr`).

    Sharded state (FSDP) is read into whatever sharding this run has: DCP reshards to another world size.
    A process without an RNG file of its own (more processes than wrote the checkpoint) takes rank 0's.
    """
    check_resumable(directory, accelerator, config)
    if (directory / checkpoint.SHARDED).is_dir():
        checkpoint.load_sharded(model, optimizer.optimizer, directory / checkpoint.SHARDED)
    else:
        checkpoint.load_model_weights(accelerator.unwrap_model(model).model, directory / "model")
        optimizer.load_state_dict(checkpoint.load_torch(directory / "optimizer.pt"))
    scheduler.load_state_dict(checkpoint.load_torch(directory / "scheduler.pt"))
    set_scheduled_lr(scheduler)
    rng = directory / f"rng-rank{accelerator.process_index}.pt"
    checkpoint.set_rng_state(checkpoint.load_torch(rng if rng.exists() else directory / "rng-rank0.pt"))
    return TrainState(**checkpoint.read_json(directory / "trainer_state.json"))


def refuse_damaged_checkpoints(output_dir) -> None:
    """For --resume without a complete checkpoint: starting fresh is right when no checkpoint was ever committed,
    but not when there are some and none verifies (a damaged file): a fresh run would empty metrics.jsonl and
    its own checkpoints would be pruned in favour of the damaged higher-numbered ones.

    Raises:
        ValueError: naming each checkpoint and what is wrong with it.
    """
    found = checkpoint.list_checkpoints(output_dir)
    if found:
        listed = "; ".join(f"{d.name}: {checkpoint.problem(d)}" for _, d in found)
        raise ValueError(f"resume: no checkpoint in {checkpoint.checkpoint_root(output_dir)} verifies ({listed}); "
                         "expected one whose files match its manifest. Restore the damaged file, or start a new "
                         "run with --overwrite or another output_dir")


def check_same_data(directory: Path, state: TrainState, fingerprint: str, config: TrainConfig) -> None:
    """Refuses to continue the checkpoint in `directory` on other training data than it was trained on: its
    data position (epoch, step in epoch) would point into another batch plan. The resume check compares the
    `train_file` path (and a moved file's bytes); a file edited in place is caught here, by the fingerprint of
    the tokenized pairs (`ref_cache.data_fingerprint`). A checkpoint without one (written before it was
    recorded) is not checked.

    Raises:
        ValueError: naming train_file, the checkpoint and both fingerprints.
    """
    if state.data_fingerprint is not None and state.data_fingerprint != fingerprint:
        raise ValueError(f"resume: train_file {config.train_file} holds other data than the checkpoint {directory} "
                         f"was trained on (tokenized pairs' fingerprint {fingerprint[:12]}, the checkpoint's "
                         f"{state.data_fingerprint[:12]}): its data position would point into other batches. "
                         "Resume with the original data, or start a new run with --overwrite or another output_dir")


def resume_or_start(config: TrainConfig, accelerator, model, optimizer, scheduler,
                    train_fingerprint: str) -> tuple[TrainState, Path | None]:
    """(the state to start from, the checkpoint it was restored from or None): with `resume`, the newest complete
    checkpoint's (models and optimizer restored in place), else a fresh state."""
    log = accelerator.print
    state, resumed_from = TrainState(), None
    if config.resume and (resumed_from := checkpoint.latest_checkpoint(config.output_dir)) is not None:
        state = load_checkpoint(resumed_from, accelerator, model, optimizer, scheduler, config)
        check_same_data(resumed_from, state, train_fingerprint, config)
        log(f"resumed from {resumed_from} at step {state.step} (epoch {state.epoch}, step {state.step_in_epoch})")
    elif config.resume:
        refuse_damaged_checkpoints(config.output_dir)
        log(f"resume: no complete checkpoint in {checkpoint.checkpoint_root(config.output_dir)}; starting fresh")
    state.data_fingerprint = train_fingerprint
    return state, resumed_from
