"""The RPO trainer, top to bottom: data, models, reference, optimizer, the step loop, report (checkpoints and
resuming: rpo_fast/resume.py; the gold eval: rpo_fast/gold_eval.py).

One optimizer step covers `gradient_accumulation_steps x world_size` packed micro-batches, taken in
order from a batch plan that every process computes identically from (seed, epoch); process r runs
micro-batches r, r + world, ... of each step. Each micro-batch loss is weighted by its share of the
step's pairs (times world_size, as DDP averages over processes), so the gradient is that of the mean
over all the step's pairs however they are split across processes and micro-batches: 2 processes give
the same step as 1 process accumulating 2 micro-batches, or as one micro-batch holding them all. With
`sft_norm="token_mean"` the NLL is weighted by the micro-batch's share of the step's chosen tokens
instead, so it too is the step's token mean (TRL and Liger average it per micro-batch, which weights a
token by the size of the micro-batch it landed in; transformers fixed the same bug for SFT with
`num_items_in_batch`).

Resuming restores weights, optimizer, scheduler, RNG states and the data position (epoch, step in
epoch), and rebuilds the same batch plan, so a resumed run continues bit for bit on the CPU. SIGTERM or SIGINT
during the step loop saves a checkpoint at the end of the step and stops (`StopRequest`, `TrainingStopped`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from . import checkpoint, gold_eval, memory_plan, metrics, modeling, oom, optim, preflight, resume, run_dir
from .config import TrainConfig, save_config
from .data import PreferenceExample, load_preference_rows, tokenize_pairs
from .gold import question_text
from .packing import batch_by_token_budget, pack_pairs
from .ref_cache import ReferenceCache, data_fingerprint, load_or_compute, model_fingerprint
from .resume import TrainState


class NonFiniteLossError(RuntimeError):
    """Raised after `max_nonfinite_steps` consecutive steps with a NaN/Inf loss or gradient norm."""


class TrainingStopped(SystemExit):
    """Training stopped by SIGTERM or SIGINT, after saving a checkpoint at a step boundary; `code` is the exit
    status (128 + the signal's number: 143 for SIGTERM, 130 for SIGINT), which the process exits with unless
    caught."""


class StopRequest:
    """SIGTERM and SIGINT during the step loop: the handlers only record the signal, and the loop saves a
    checkpoint and stops at the next step boundary. A second signal stops at once (the previous handlers, which
    `installed` restores on the way out, get it). Handlers can only be set in the main thread: elsewhere
    nothing is installed and signals behave as before."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second one: stop now
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def _restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self.previous = {}

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        try:
            yield self
        finally:
            self._restore()

    def agreed(self, accelerator) -> int | None:
        """The signal to stop for, the same on every process (any process that got one stops them all: SIGTERM
        if any got SIGTERM); None to go on. One all-reduce when there are several processes."""
        if accelerator.num_processes == 1:
            return self.signum
        got = torch.tensor([float(self.signum == s) for s in self.SIGNALS], dtype=torch.float64)
        got = accelerator.reduce(got.to(accelerator.device), "sum").cpu()
        return next((int(s) for s, n in zip(self.SIGNALS, got.tolist()) if n > 0), None)


@dataclass
class TrainHooks:
    """Test and extension points; `step` is 1-based (the step being run / just finished).

    on_step_end(step, record, policy): runs after every step, checkpointing included (raise to interrupt);
        `policy` is the unwrapped model being trained.
    transform_loss(step, loss): may replace each micro-batch loss before backward (e.g. inject NaN, or raise
        an out-of-memory error in tests).
    """

    on_step_end: Callable[[int, dict, torch.nn.Module], None] | None = None
    transform_loss: Callable[[int, torch.Tensor], torch.Tensor] | None = None


@dataclass
class TrainResult:
    model: torch.nn.Module  # the trained policy (LoRA merged for finetune=lora)
    state: TrainState
    records: list[dict]
    table: str
    output_dir: Path


# --- data and the batch plan ----------------------------------------------------------------------------------


def load_examples(path: str, tokenizer, config: TrainConfig, log=print) -> tuple[list[dict], list[PreferenceExample]]:
    """(rows, tokenized examples) of one preference file; logs the tokenization report (drops, truncation)."""
    rows = load_preference_rows(path)
    examples, stats = tokenize_pairs(rows, tokenizer, max_length=config.max_length,
                                     max_prompt_length=config.max_prompt_length, source=str(path))
    log(str(stats))
    if not examples:
        raise ValueError(f"{path}: no usable pairs after tokenization ({stats.n_dropped} dropped)")
    if stats.max_pair_tokens > config.token_budget:
        log(f"warning: the longest pair has {stats.max_pair_tokens} tokens > token_budget={config.token_budget}; "
            "such pairs get a micro-batch of their own")
    return rows, examples


def epoch_steps(examples: Sequence[PreferenceExample], config: TrainConfig, epoch: int,
                world_size: int) -> list[list[list[int]]]:
    """The steps of one epoch: each a list of `gradient_accumulation_steps * world_size` micro-batches (lists
    of example positions). Micro-batches left over at the end of the epoch (fewer than one step) are dropped."""
    groups = batch_by_token_budget(examples, config.token_budget, max_pairs=config.max_pairs_per_micro_batch,
                                   shuffle=config.shuffle, seed=config.seed, epoch=epoch)
    per_step = config.gradient_accumulation_steps * world_size
    if len(groups) < per_step:
        raise ValueError(f"token_budget: the training set packs into {len(groups)} micro-batches, fewer than one "
                         f"step needs (gradient_accumulation_steps x processes = {per_step}); lower token_budget "
                         "or max_pairs_per_micro_batch")
    return [groups[i:i + per_step] for i in range(0, len(groups) - per_step + 1, per_step)]


def total_steps(examples, config: TrainConfig, world_size: int) -> int:
    if config.max_steps:
        return config.max_steps
    return sum(len(epoch_steps(examples, config, e, world_size)) for e in range(config.num_epochs))


# --- models ---------------------------------------------------------------------------------------------------


def build_policy(config: TrainConfig, device: torch.device):
    model = modeling.load_causal_lm(config.model, config.gguf_file, dtype=config.dtype).to(device)
    if config.liger_kernels:
        modeling.enable_liger_kernels(model)
    return model


def finish_policy(model, config: TrainConfig):
    """LoRA (or all weights trainable) and gradient checkpointing, once any reference copy has been taken."""
    if config.finetune == "lora":
        model = modeling.add_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                  target_modules=config.lora_target_modules)
    else:
        model.requires_grad_(True)
    if config.gradient_checkpointing:
        modeling.enable_gradient_checkpointing(model)
    model.train()
    return model


def build_optimizer(model, config: TrainConfig, steps: int):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    # Weight decay skips 1-D parameters (norms, biases); `config.optimizer` picks the memory mode.
    optimizer = optim.build_optimizer(model, config.optimizer, lr=config.learning_rate,
                                      betas=(config.adam_beta1, config.adam_beta2),
                                      weight_decay=config.weight_decay, eps=config.adam_eps,
                                      gradient_accumulation_steps=config.gradient_accumulation_steps,
                                      max_grad_norm=config.max_grad_norm or None, seed=config.seed,
                                      compile=config.optimizer_compile)
    if config.lr_scheduler == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, config.warmup_steps)
    return optimizer, scheduler


class Reference:
    """The reference policy in one of four modes; `inputs(batch, split, autocast)` -> keyword arguments for
    PackedRPOModel.

    "none": no reference; "cache": the log-probs in `caches[split]`; "model": the `frozen` model's forward;
    "adapter": `policy` is the LoRA policy, run with its adapter disabled through the forward of `wrapped`, the
    PackedRPOModel around it as accelerate prepared it (under FSDP only that forward gathers the embeddings and
    the head)."""

    def __init__(self, mode: str, *, frozen=None, policy=None, caches: dict[str, ReferenceCache] | None = None,
                 wrapped=None):
        self.mode, self.frozen, self.policy, self.caches = mode, frozen, policy, caches or {}
        self.wrapped = wrapped

    def inputs(self, batch, split: str, autocast) -> dict:
        if self.mode == "none":
            return {}
        if self.mode == "cache":
            return {"ref_logps": self.caches[split].lookup(batch.example_index)}
        model = self.frozen if self.mode == "model" else self.policy
        adapter_off = self.policy.disable_adapter() if self.mode == "adapter" else contextlib.nullcontext()
        was_training = model.training
        model.eval()  # the reference never sees dropout
        with adapter_off, autocast(), torch.no_grad():
            if self.mode == "adapter":
                ref_hidden, ref_weight, ref_bias = self.wrapped(batch, head_inputs_only=True)
            else:
                ref_hidden, ref_weight, ref_bias = modeling.reference_head_inputs(model, batch)
        model.train(was_training)
        return {"ref_hidden": ref_hidden, "ref_weight": ref_weight, "ref_bias": ref_bias}


def resolve_share_prompt(config: TrainConfig, model, log) -> TrainConfig:
    """`config`, with share_prompt off (and a one-line notice) when `model` cannot run shared-prompt rows."""
    if config.share_prompt and (reason := modeling.shared_prompt_unsupported(model)) is not None:
        log(f"notice: share_prompt is off: {reason}; each pair is packed as two full sequences")
        return dataclasses.replace(config, share_prompt=False)
    return config


def build_reference(config: TrainConfig, policy, datasets: dict[str, list], accelerator, log) -> Reference:
    """The reference of modes "none", "model" and "cache" ("adapter" runs the prepared policy: `build_models`).
    Called before LoRA is added: `policy` is still the initial model, the default reference. Runs the
    reference in `config.share_prompt`'s layout, which a separate `ref_model` must support too."""
    if config.reference == "adapter":
        raise ValueError("reference: 'adapter' is the trained policy with its adapter off, not built here")
    if config.reference == "none":
        return Reference("none")
    if config.ref_model:
        source = modeling.load_causal_lm(config.ref_model, dtype=config.dtype).to(accelerator.device)
        if config.liger_kernels:
            modeling.enable_liger_kernels(source)
        source = modeling.freeze(source)
        if config.share_prompt and (reason := modeling.shared_prompt_unsupported(source)) is not None:
            raise ValueError(f"ref_model: share_prompt=true, but for the reference model {reason}; "
                             "set share_prompt=false")
    else:
        source = policy if config.reference == "cache" else modeling.freeze(copy.deepcopy(policy))
    if config.reference == "model":
        return Reference("model", frozen=source)
    caches, fingerprint = {}, model_fingerprint(source)
    for split, examples in datasets.items():
        if accelerator.is_main_process:  # one process computes and writes; the others read the file
            load_or_compute(source, examples, config.ref_cache_dir, token_budget=config.token_budget,
                            impl=config.impl, model_fp=fingerprint, progress=config.progress,
                            share_prompt=config.share_prompt, autocast=accelerator.autocast)
        accelerator.wait_for_everyone()
        caches[split] = load_or_compute(source, examples, config.ref_cache_dir, token_budget=config.token_budget,
                                        impl=config.impl, model_fp=fingerprint, write=False,
                                        share_prompt=config.share_prompt, autocast=accelerator.autocast)
        log(f"reference log-probs ({split}): {caches[split].path}")
    return Reference("cache", caches=caches)


# --- one step -------------------------------------------------------------------------------------------------


def run_step(model, reference: Reference, examples, step_groups, accelerator, config: TrainConfig,
             step: int, hooks: TrainHooks) -> tuple[torch.Tensor, int, int]:
    """Forward and backward of this process's share of one step's micro-batches.

    Returns (metric sums over this process's pairs [len(PAIR_METRICS)] on the device, sequence tokens, response
    tokens); sequence tokens count every pair's two full sequences, the prompt twice even when packed shared.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    step_pairs = sum(len(g) for g in step_groups)
    step_chosen_tokens = sum(len(examples[i].chosen_ids) for g in step_groups for i in g)
    mine = step_groups[rank::world]
    sums = torch.zeros(len(metrics.PAIR_METRICS), dtype=torch.float64, device=accelerator.device)
    tokens = response_tokens = 0
    for k, group in enumerate(mine):
        batch = pack_pairs([examples[i] for i in group], share_prompt=config.share_prompt).to(accelerator.device)
        sync = k == len(mine) - 1  # DDP all-reduces gradients on the last micro-batch only
        try:
            ref = reference.inputs(batch, "train", accelerator.autocast)
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                nll_pairs = token_mean_nll_pairs(sum(len(examples[i].chosen_ids) for i in group), config,
                                                 step_pairs, step_chosen_tokens)
                # The micro-batch's weights enter the head: its gradient is formed in forward (fwdgrad).
                out = model(batch, **ref, pair_weight=batch.n_pairs * world / step_pairs,
                            nll_weight=(batch.n_pairs if nll_pairs is None else nll_pairs) * world / step_pairs)
                loss = out.loss
                if hooks.transform_loss is not None:
                    loss = hooks.transform_loss(step, loss)
                # An in-backward optimizer updates weights during backward: a non-finite loss must not get there.
                if not (config.steps_in_backward and not torch.isfinite(loss.detach()).item()):
                    accelerator.backward(loss)
        except torch.OutOfMemoryError as e:
            policy = accelerator.unwrap_model(model).model
            raise oom.TrainingOutOfMemoryError(oom.out_of_memory_message(
                config, step, batch.n_pairs, batch.num_tokens, batch.num_response_tokens,
                getattr(policy, "config", None), oom.device_memory_bytes(accelerator.device),
                run_world(accelerator))) from e
        sums += metrics.pair_metric_sums(out, batch.n_pairs, nll_pairs, alpha=config.alpha)
        tokens += batch.sequence_tokens  # counted unshared, so tokens/s compares across layouts
        response_tokens += batch.num_response_tokens
    return sums, tokens, response_tokens


def token_mean_nll_pairs(chosen_tokens: int, config: TrainConfig, total_pairs: int,
                         total_chosen_tokens: int) -> float | None:
    """For sft_norm="token_mean": the micro-batch's share (`chosen_tokens` of its chosen responses) of all
    chosen tokens, in pairs (its NLL's weight in a pair-weighted sum whose total is `total_pairs`); None for
    the other norms (weight = its pairs)."""
    if config.sft_norm != "token_mean":
        return None
    return total_pairs * chosen_tokens / total_chosen_tokens


def apply_update(model, optimizer, accelerator, config: TrainConfig, loss: float) -> tuple[bool, float, int | None]:
    """Clips and steps after a step's backward, unless its loss or gradient norm is not finite.

    Returns (stepped, the pre-clip global gradient norm, None or, for a skipped in-backward step, how many
    parameters its backward had updated before the first non-finite gradient (see rpo_fast/optim.py);
    a skipped step leaves every other weight and optimizer state untouched).
    """
    params_updated = None
    if config.steps_in_backward:  # stepped during backward already
        optimizer.step()  # publishes what the backward did
        stepper = optimizer.optimizer
        grad_norm = math.nan if stepper.last_grad_norm is None else stepper.last_grad_norm
        finite = math.isfinite(loss) and stepper.last_step_complete and math.isfinite(grad_norm)
        if not finite:
            params_updated = stepper.last_params_updated
    else:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or math.inf))
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
    # Under DDP the gradients are views into its buckets (make_accelerator), which stay allocated: zeroed in place,
    # they stay views, and the next step accumulates into them; set to None, each step would allocate them anew.
    optimizer.zero_grad(set_to_none=not isinstance(model, torch.nn.parallel.DistributedDataParallel))
    return finite, grad_norm, params_updated


@torch.no_grad()
def evaluate(model, reference: Reference, examples, accelerator, config: TrainConfig, split: str = "eval") -> dict:
    """Pair-weighted means of PAIR_METRICS over `examples` (no gradient), as {"eval/<name>": value}."""
    groups = batch_by_token_budget(examples, config.token_budget, max_pairs=config.max_pairs_per_micro_batch,
                                   shuffle=False, seed=0, epoch=0)
    module = accelerator.unwrap_model(model)  # no DDP gradient sync in eval
    was_training = module.training
    module.eval()
    sums = torch.zeros(len(metrics.PAIR_METRICS), dtype=torch.float64, device=accelerator.device)
    chosen_tokens = sum(len(ex.chosen_ids) for ex in examples)
    world = accelerator.num_processes
    mine = groups[accelerator.process_index::world]
    # Every process makes the same number of forwards: under FSDP each forward is a collective (so is the DDP
    # buffer sync of an adapter-off reference run through the wrapped model). One with fewer groups repeats
    # the set's first group and drops its sums.
    rounds = -(-len(groups) // world)
    bar = metrics.progress_bar(rounds, 0, enabled=config.progress and accelerator.is_main_process, desc=split,
                               unit="batch", leave=False)  # the demo's eval: ~36 s on 2 cores
    for k in range(rounds):
        group = mine[k] if k < len(mine) else groups[0]
        batch = pack_pairs([examples[i] for i in group], share_prompt=config.share_prompt).to(accelerator.device)
        with accelerator.autocast():
            out = module(batch, **reference.inputs(batch, split, accelerator.autocast))
        if k < len(mine):
            batch_chosen = sum(len(examples[i].chosen_ids) for i in group)
            sums += metrics.pair_metric_sums(out, batch.n_pairs, token_mean_nll_pairs(
                batch_chosen, config, len(examples), chosen_tokens), alpha=config.alpha)
        bar.update(1)
    bar.close()
    module.train(was_training)
    sums = accelerator.reduce(sums, "sum").cpu()
    return metrics.metrics_from_sums(sums, len(examples), prefix="eval/")


# --- processes ------------------------------------------------------------------------------------------------


def run_world(accelerator) -> memory_plan.World:
    """The run's processes, as the memory planner sees them: how many, and whether FSDP shards the model."""
    return memory_plan.World(accelerator.num_processes, resume.is_sharded(accelerator))


def make_accelerator(config: TrainConfig):
    """An Accelerator for this run; on the CPU its processes talk over gloo (torchrun / accelerate launch)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one global state per process; a second run in the same process (tests, notebooks) may
    # ask for another mixed precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # DDP: the gradients are views into its all-reduce buckets rather than a second gradient-sized copy.
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
    return Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[ddp])


# --- the run --------------------------------------------------------------------------------------------------


@dataclass
class RunData:
    """A run's tokenized pairs, and the steps planned from them."""

    train_examples: list[PreferenceExample]
    train_fingerprint: str  # ref_cache.data_fingerprint: a checkpoint records it, --resume compares
    eval_rows: list[dict] | None  # the eval file's rows (the gold eval grades against them); None without eval_file
    eval_examples: list[PreferenceExample]
    eval_fingerprint: str | None  # recorded with each eval: the final table compares evals of the same pairs only
    steps: int  # optimizer steps of the whole run


@dataclass
class Run:
    """The objects of one training run, as `train` built them: what its steps, evals and checkpoints work on."""

    config: TrainConfig
    accelerator: Any
    tokenizer: Any
    data: RunData
    reference: Reference
    model: torch.nn.Module  # the PackedRPOModel around the policy, as accelerate prepared it
    optimizer: Any
    scheduler: Any  # ours, not prepared: one scheduler step per optimizer step
    state: TrainState
    logger: metrics.MetricsLogger | None  # on the main process only
    hooks: TrainHooks

    @property
    def log(self) -> Callable[[str], None]:
        return self.accelerator.print

    @property
    def policy(self) -> torch.nn.Module:
        """The model being trained, out of accelerate's wrapper and the PackedRPOModel."""
        return self.accelerator.unwrap_model(self.model).model

    def save_checkpoint(self) -> None:
        resume.save_checkpoint(self.accelerator, self.model, self.tokenizer, self.optimizer, self.scheduler,
                               self.state, self.config, self.logger)

    def run_eval(self, step: int) -> dict:
        """The eval set's metrics (and gold accuracy) at `step`, added to the state's eval history and logged."""
        accelerator, config, data = self.accelerator, self.config, self.data
        start = time.perf_counter()
        record = {"step": step, **evaluate(self.model, self.reference, data.eval_examples, accelerator, config)}
        if config.gold_eval_samples and data.eval_rows is not None:
            sharded = resume.is_sharded(accelerator)  # FSDP: every process must take part in each forward
            if sharded or accelerator.is_main_process:
                accuracy, answers = gold_eval.gold_accuracy(self.policy, self.tokenizer, data.eval_rows,
                                                            data.eval_examples, config, accelerator.device,
                                                            synced=sharded)
                record["eval/gold_accuracy"] = accuracy
                for ex, answer in list(zip(data.eval_examples, answers))[:3]:
                    self.log(f"  step {step}: {question_text(data.eval_rows[ex.index])!r} -> {answer.strip()!r}")
            accelerator.wait_for_everyone()
        record["eval/time_s"] = time.perf_counter() - start
        self.state.eval_history.append({**record, "data_fingerprint": data.eval_fingerprint})
        if self.logger:
            self.logger.log(record)
        return record


def train(config: TrainConfig, hooks: TrainHooks | None = None) -> TrainResult:
    """Runs RPO training as configured; returns the trained model and the metric records."""
    config.validate()
    preflight.check_run(config)  # model paths, data files, device, run folder: before anything slow loads
    run_start = time.perf_counter()
    accelerator = make_accelerator(config)
    open_run(config, accelerator)
    tokenizer = modeling.load_tokenizer(config.model, config.gguf_file)
    data = load_run_data(config, tokenizer, accelerator)
    config, reference, model, optimizer, scheduler = build_models(config, accelerator, data)
    state, resumed_from = resume.resume_or_start(config, accelerator, model, optimizer, scheduler,
                                                 data.train_fingerprint)
    if accelerator.is_main_process:
        save_config(config, Path(config.output_dir) / "config.yaml")
    logger = metrics.MetricsLogger(config.output_dir, tensorboard=config.tensorboard,
                                   resume_step=state.step if resumed_from else None) \
        if accelerator.is_main_process else None
    run = Run(config=config, accelerator=accelerator, tokenizer=tokenizer, data=data, reference=reference, model=model,
              optimizer=optimizer, scheduler=scheduler, state=state, logger=logger, hooks=hooks or TrainHooks())
    if data.eval_examples and not resumed_from:
        before = run.run_eval(0)
        run.log("eval before training: " + ", ".join(f"{k[5:]} {v:.4g}" for k, v in before.items() if k != "step"))
    steps_run = train_steps(run)
    return finish(run, nothing_ran=resumed_from is not None and steps_run == 0, run_start=run_start)


def open_run(config: TrainConfig, accelerator) -> None:
    """Claims output_dir for this run (deleting an earlier run's files first with `overwrite`), and seeds it."""
    log = accelerator.print
    if config.overwrite and accelerator.is_main_process and (cleared := run_dir.clear(config.output_dir)):
        log(f"overwrite: deleted the earlier run's {', '.join(cleared)} in {config.output_dir}")
    if accelerator.is_main_process:
        run_dir.claim(config.output_dir)
    accelerator.wait_for_everyone()
    # A library may draw from the global RNGs when first imported (huggingface_hub 1.33 does, under peft).
    # Imported before seeding, the run's RNG states (and so its checkpoints) do not depend on what the process
    # happened to import earlier: a resumed run in a fresh process saves the states an uninterrupted one does.
    if config.finetune == "lora":
        import peft  # noqa: F401
    set_seed(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)


def load_run_data(config: TrainConfig, tokenizer, accelerator) -> RunData:
    """The train (and eval) pairs, tokenized once, and the run's step count; logs what the run will train on.
    The batch plan is a pure function of (examples, config, epoch, world size)."""
    log = accelerator.print
    _, train_examples = load_examples(config.train_file, tokenizer, config, log)
    eval_rows, eval_examples = None, []
    if config.eval_file:
        eval_rows, eval_examples = load_examples(config.eval_file, tokenizer, config, log)
        if warning := gold_eval.gold_length_warning(tokenizer, eval_examples, config.gold_eval_samples,
                                                    config.gold_max_new_tokens):
            log(warning)
    world = accelerator.num_processes
    if config.steps_in_backward and world > 1:  # DDP/FSDP reduce gradients after the hooks that would step them
        raise ValueError(f"optimizer: {config.optimizer!r} steps during backward, before gradients are reduced "
                         f"across processes: expected one process, got {world}; use "
                         f"{optim.parse_mode(config.optimizer)[0]!r}")
    steps = total_steps(train_examples, config, world)
    left_over = len(train_examples) - sum(len(group) for step in epoch_steps(train_examples, config, 0, world)
                                          for group in step)
    log(f"{len(train_examples)} training pairs, {steps} steps of {config.gradient_accumulation_steps} x {world} "
        f"micro-batches (token_budget={config.token_budget}), {world} process(es) on {accelerator.device}"
        + (f"; {left_over} pairs of the first epoch left over (fewer micro-batches than a step)" if left_over else ""))
    return RunData(train_examples=train_examples, train_fingerprint=data_fingerprint(train_examples),
                   eval_rows=eval_rows, eval_examples=eval_examples,
                   eval_fingerprint=data_fingerprint(eval_examples) if eval_examples else None, steps=steps)


def build_models(config: TrainConfig, accelerator, data: RunData):
    """(config, reference, model, optimizer, scheduler): the policy and its reference, the PackedRPOModel around
    the policy and its optimizer, both prepared by accelerate, the scheduler; `config` has share_prompt off when
    the model cannot run it."""
    log = accelerator.print
    start = time.perf_counter()
    policy = build_policy(config, accelerator.device)
    config = resolve_share_prompt(config, policy, log)
    if accelerator.device.type == "cuda":
        log(memory_plan.forecast(config, policy.config, oom.device_memory_bytes(accelerator.device),
                                 run_world(accelerator)))
    splits = {"train": data.train_examples, **({"eval": data.eval_examples} if data.eval_examples else {})}
    # A reference model or cache is taken before LoRA is added (the initial policy is the default reference);
    # reference=adapter is the policy itself with its adapter off, run through the prepared model (below).
    reference = build_reference(config, policy, splits, accelerator, log) if config.reference != "adapter" else None
    policy = finish_policy(policy, config)
    # Every process built the same weights from one seed; from here on each draws its own dropout masks (a
    # resumed run restores each process's RNG state instead).
    set_seed((config.seed + accelerator.process_index) % 2**32)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    log(f"policy: {type(modeling.base_model(policy)).__name__}, {trainable:,} trainable parameters "
        f"({config.finetune}), reference: {config.reference}, attention: {policy.config._attn_implementation} "
        f"(models ready in {time.perf_counter() - start:.0f} s)")

    loss_options = dict(beta=config.beta, alpha=config.alpha, sft_norm=config.sft_norm, loss_type=config.loss_type,
                        label_smoothing=config.label_smoothing, average_log_prob=config.average_log_prob,
                        impl=config.impl, backward=config.head_backward, chunk_tokens=config.head_chunk_tokens)
    model = modeling.PackedRPOModel(policy, **loss_options)
    optimizer, scheduler = build_optimizer(model, config, data.steps)
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler stays ours: one step per step
    if config.reference == "adapter":
        reference = Reference("adapter", policy=policy, wrapped=model)
    return config, reference, model, optimizer, scheduler


def train_steps(run: Run) -> int:
    """The step loop, from the state's step to the run's last; returns how many steps it ran. Evals and
    checkpoints fall between steps as scheduled; SIGTERM or SIGINT saves a checkpoint and stops
    (`TrainingStopped`)."""
    config, state, accelerator, steps = run.config, run.state, run.accelerator, run.data.steps
    train_examples, eval_examples, world = run.data.train_examples, run.data.eval_examples, accelerator.num_processes
    bar = metrics.progress_bar(steps, state.step, enabled=config.progress and accelerator.is_main_process)
    loop_start, first_step = time.perf_counter(), state.step
    plan_epoch, plan = None, []
    with StopRequest().installed() as stop:
        while state.step < steps:
            if plan_epoch != state.epoch:
                plan, plan_epoch = epoch_steps(train_examples, config, state.epoch, world), state.epoch
            if state.step_in_epoch >= len(plan):
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
                continue
            record = train_step(run, plan[state.step_in_epoch])
            bar.set_postfix(metrics.progress_postfix(record), refresh=False)
            bar.update(1)
            if record["skipped"]:
                check_nonfinite(run, record)
            if config.eval_every and eval_examples and state.step % config.eval_every == 0 and state.step < steps:
                run.run_eval(state.step)
            saved = config.save_every and state.step % config.save_every == 0 and state.step < steps
            if saved:
                run.save_checkpoint()
            if run.hooks.on_step_end is not None:
                run.hooks.on_step_end(state.step, record, run.policy)
            if (signum := stop.agreed(accelerator)) is not None:  # SIGTERM / SIGINT: save, then exit
                stop_for_signal(run, signum, saved, bar)
    bar.close()
    run.log(f"{state.step - first_step} steps in {time.perf_counter() - loop_start:.0f} s")
    return state.step - first_step


def train_step(run: Run, step_groups: list[list[int]]) -> dict:
    """One optimizer step on `step_groups` (its micro-batches), or a skipped one (non-finite loss or gradient):
    moves the state on a step and returns the step's record, logged every `log_every` steps, on the last step
    and on a skipped one."""
    config, state, accelerator, model = run.config, run.state, run.accelerator, run.model
    start = time.perf_counter()
    metrics.reset_peak_memory(accelerator.device)  # peak_mem_mb: this step's, not eval's or loading's
    sums, tokens, response_tokens = run_step(model, run.reference, run.data.train_examples, step_groups,
                                             accelerator, config, state.step + 1, run.hooks)
    counts = torch.tensor([tokens, response_tokens], dtype=torch.float64, device=sums.device)
    reduced = accelerator.reduce(torch.cat([sums, counts]), "sum").cpu()
    sums, (tokens, response_tokens) = reduced[:-2], reduced[-2:].tolist()
    step_pairs = sum(len(g) for g in step_groups)
    record = {"step": state.step + 1, "epoch": state.epoch, **metrics.metrics_from_sums(sums, step_pairs),
              "lr": run.scheduler.get_last_lr()[0]}  # the lr this step runs at (the scheduler moves on below)
    try:
        finite, grad_norm, params_updated = apply_update(model, run.optimizer, accelerator, config, record["loss"])
    except torch.OutOfMemoryError as e:
        raise oom.TrainingOutOfMemoryError(oom.update_out_of_memory_message(
            config, state.step + 1, getattr(run.policy, "config", None),
            oom.device_memory_bytes(accelerator.device), run_world(accelerator))) from e
    if finite:
        run.scheduler.step()
        state.consecutive_nonfinite = 0
    else:  # skipped: move on to the next batch
        state.skipped_steps += 1
        state.consecutive_nonfinite += 1
        if params_updated is not None:
            record["params_updated"] = params_updated
    state.step += 1
    state.step_in_epoch += 1
    elapsed = time.perf_counter() - start
    record.update({"grad_norm": grad_norm, "pairs": step_pairs,
                   "tokens": int(tokens), "response_tokens": int(response_tokens), "tokens/s": tokens / elapsed,
                   "step_time_s": elapsed, "peak_mem_mb": metrics.peak_memory_mb(accelerator.device),
                   "skipped": not finite, "skipped_steps": state.skipped_steps})
    if run.logger and (state.step % config.log_every == 0 or not finite or state.step == run.data.steps):
        run.logger.log(record)
    return record


def check_nonfinite(run: Run, record: dict) -> None:
    """After a skipped step: says so, and raises NonFiniteLossError once `max_nonfinite_steps` in a row were."""
    state, grad_norm = run.state, record["grad_norm"]
    partly = record.get("params_updated")
    run.log(f"step {state.step}: non-finite loss or gradient (loss {record['loss']}, grad norm {grad_norm}): "
            f"skipped ({state.consecutive_nonfinite} in a row, {state.skipped_steps} in all)"
            + (f"; {partly} parameter tensors nearer the output had been updated in backward before the "
               "first non-finite gradient" if partly else ""))
    if state.consecutive_nonfinite >= run.config.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"stopping at step {state.step}: {state.consecutive_nonfinite} consecutive steps had a "
            f"non-finite loss or gradient (max_nonfinite_steps={run.config.max_nonfinite_steps}); last loss "
            f"{record['loss']}, grad norm {grad_norm}. Lower learning_rate, check the data, or use "
            "gradient clipping (max_grad_norm)")


def stop_for_signal(run: Run, signum: int, saved: bool, bar) -> None:
    """Stops the run at a step boundary for SIGTERM / SIGINT: saves a checkpoint (unless this step saved one),
    then raises TrainingStopped."""
    if not saved:
        run.save_checkpoint()
    bar.close()
    if run.logger:
        run.logger.close()
    saved_dir = checkpoint.checkpoint_root(run.config.output_dir) / checkpoint.step_dir_name(run.state.step)
    run.log(f"stopped by {signal.Signals(signum).name} after step {run.state.step} of {run.data.steps}: saved the "
            f"checkpoint {saved_dir}; run the same command with --resume to continue")
    raise TrainingStopped(128 + signum)


def finish(run: Run, *, nothing_ran: bool, run_start: float) -> TrainResult:
    """The end of a run: the final checkpoint and eval, the trained model saved for use, the report.

    A resumed run whose checkpoint already reached its steps (a finished run, or a shorter max_steps) trains
    nothing (`nothing_ran`): its checkpoint is the final one (not written again), and its final eval the one
    logged at that step, not a second record of the same model; none is logged when the run was killed after its
    final checkpoint but before its final eval, which then runs now.
    """
    config, state, accelerator, log = run.config, run.state, run.accelerator, run.log
    output_dir, eval_examples = Path(config.output_dir), run.data.eval_examples
    after = None
    if nothing_ran:
        log(f"the checkpoint is at step {state.step}, and this run has {run.data.steps} steps: nothing to train")
        after = logged_eval(run.logger, state.step, accelerator) if eval_examples else None
    else:
        run.save_checkpoint()
    if eval_examples and after is None:
        after = run.run_eval(state.step)
    policy = run.policy
    if config.finetune == "lora":
        policy = policy.merge_and_unload()
    weights = resume.gathered_state_dict(accelerator, policy)  # under FSDP: a collective, the whole model on rank 0
    records = metrics.read_records(run.logger.path) if run.logger else []
    table = ""
    if accelerator.is_main_process:
        modeling.save_pretrained(policy, run.tokenizer, output_dir / "model", state_dict=weights)
        before = state.eval_history[0] if state.eval_history and state.eval_history[0]["step"] == 0 else None
        if before is not None and before.get("data_fingerprint") not in (None, run.data.eval_fingerprint):
            log(f"note: eval_file {config.eval_file} holds other pairs than the eval before training ran on (it "
                "changed on --resume): the table leaves 'eval before' blank rather than compare two eval sets")
            before = None
        table = metrics.final_table([r for r in records if "loss" in r], before, after)
        (output_dir / "final_metrics.txt").write_text(table + "\n", encoding="utf-8")
        log("\n" + table)
        if config.plot:
            log(f"plot: {metrics.plot_metrics(records, output_dir / 'metrics.png')}")
        log(f"model: {output_dir / 'model'}")
        log(f"done in {time.perf_counter() - run_start:.0f} s")
        run.logger.close()
    accelerator.wait_for_everyone()
    return TrainResult(model=policy, state=state, records=records, table=table, output_dir=output_dir)


def logged_eval(logger, step: int, accelerator) -> dict | None:
    """The eval record logged at `step` in metrics.jsonl (read on the main process), or None. Every process gets
    None when the main process found none (they then run the eval together), the record's presence being
    agreed across processes; only the main process gets the record itself."""
    found = None
    if logger is not None:
        found = next((r for r in reversed(metrics.read_records(logger.path))
                      if r.get("step") == step and "eval/loss" in r), None)
    if accelerator.num_processes > 1:
        missing = torch.tensor([float(accelerator.is_main_process and found is None)], dtype=torch.float64)
        if accelerator.reduce(missing.to(accelerator.device), "sum").item() > 0:
            return None
        return found if found is not None else {}
    return found


def precompute_reference(config: TrainConfig) -> dict[str, Path]:
    """Fills the reference log-prob cache of the train (and eval) set for `config` (`rpo-fast precompute-ref`).

    The reference is `ref_model`, or else the initial `model`; the files land in `ref_cache_dir`, under
    the key that `train` with `reference: cache` looks up (with another `reference` it warns: train would not
    read them). Returns {split: cache file}.
    """
    preflight.check_sources(config)
    preflight.check_ref_cache_dir(config)
    accelerator = make_accelerator(config)
    if config.reference != "cache":
        accelerator.print(f"warning: reference is {config.reference!r}: train reads these log-probs only with "
                          "reference: cache (--reference=cache)")
    tokenizer = modeling.load_tokenizer(config.model, config.gguf_file)
    splits = {"train": load_examples(config.train_file, tokenizer, config, accelerator.print)[1]}
    if config.eval_file:
        splits["eval"] = load_examples(config.eval_file, tokenizer, config, accelerator.print)[1]
    source = None if config.ref_model else build_policy(config, accelerator.device)
    if source is not None:
        config = resolve_share_prompt(config, source, accelerator.print)
    reference = build_reference(dataclasses.replace(config, reference="cache"), source, splits, accelerator,
                                accelerator.print)
    return {split: cache.path for split, cache in reference.caches.items()}
