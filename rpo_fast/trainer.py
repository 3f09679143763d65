"""The RPO trainer, top to bottom: data, models, reference, optimizer, the step loop, checkpoints, report.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed

from . import checkpoint, memory_plan, metrics, modeling, oom, optim, preflight, run_dir
from .config import TrainConfig, load_config, save_config
from .data import PreferenceExample, load_preference_rows, tokenize_pairs
from .packing import batch_by_token_budget, pack_pairs
from .ref_cache import ReferenceCache, data_fingerprint, load_or_compute, model_fingerprint


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
    """The reference policy in one of four modes; `inputs(batch)` -> keyword arguments for PackedRPOModel.

    "adapter": `policy` is the LoRA policy, run with its adapter disabled; `wrapped`, once set, is the
    PackedRPOModel around it as accelerate prepared it, through whose forward the reference then runs (under
    FSDP only that forward gathers the embeddings and the head)."""

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
            if self.mode == "adapter" and self.wrapped is not None:
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
    """Called before LoRA is added: `policy` is still the initial model, the default reference. Runs the
    reference in `config.share_prompt`'s layout, which a separate `ref_model` must support too."""
    if config.reference in ("none", "adapter"):
        return Reference(config.reference)
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


@torch.no_grad()
def gold_accuracy(model, tokenizer, rows, examples, config: TrainConfig, device, *,
                  synced: bool = False) -> tuple[float, list[str]]:
    """Greedy answers to the first `gold_eval_samples` eval prompts, scored by the dataset's gold rule.

    `synced`: every process runs this call on the same prompts (a sharded model's forward is a collective), and
    generation runs all `gold_max_new_tokens` steps on every process (`synced_gpus`), so none waits for a
    forward another has stopped making.

    Returns (fraction correct, the generated answers)."""
    from .attention import generation_attention
    from .data import gold_reward

    chosen = examples[:config.gold_eval_samples]
    lm = modeling.base_model(model)
    was_training = model.training
    model.eval()
    width = max(len(ex.prompt_ids) for ex in chosen)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ex.prompt_ids)) + ex.prompt_ids.tolist() for ex in chosen],
                             device=device)
    mask = torch.tensor([[0] * (width - len(ex.prompt_ids)) + [1] * len(ex.prompt_ids) for ex in chosen],
                        device=device)
    with generation_attention(lm):
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=config.gold_max_new_tokens,
                             do_sample=False, pad_token_id=pad, use_cache=True, synced_gpus=synced)
    model.train(was_training)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return sum(gold_reward(rows[ex.index], text) for ex, text in zip(chosen, texts)) / len(chosen), texts


def gold_answer_tokens(tokenizer, example: PreferenceExample) -> int:
    """New tokens a generation needs to hold `example`'s whole chosen answer: its chosen response's tokens up to
    the last one that changes the decoded, stripped text (the end of turn and what follows it are not needed)."""
    ids = example.chosen_ids.tolist()
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    n = len(ids)
    while n > 1 and tokenizer.decode(ids[:n - 1], skip_special_tokens=True).strip() == text:
        n -= 1
    return n


def gold_length_warning(tokenizer, examples, samples: int, max_new_tokens: int) -> str | None:
    """A warning when `max_new_tokens` (gold_max_new_tokens) cuts the chosen answer of a gold-eval prompt (the
    first `samples` eval examples): a model that gives exactly that answer would be graded wrong. None when every
    chosen answer fits."""
    lengths = [(gold_answer_tokens(tokenizer, ex), ex.index) for ex in examples[:samples]]
    need, row = max(lengths, default=(0, None))
    if need <= max_new_tokens:
        return None
    cut = sum(n > max_new_tokens for n, _ in lengths)
    return (f"warning: gold_max_new_tokens={max_new_tokens} is shorter than {cut} of the "
            f"{len(lengths)} gold-eval prompts' chosen answers (the longest, eval row {row}, takes {need} tokens): "
            f"a generation giving exactly that answer is cut and graded wrong; set gold_max_new_tokens >= {need}")


def gold_question(row: dict) -> str:
    from .gold import question_text

    return question_text(row)


# --- checkpoints ----------------------------------------------------------------------------------------------


def is_sharded(accelerator) -> bool:
    """True under FSDP: each rank holds a shard of the weights and optimizer state, so checkpoints write them
    with torch.distributed.checkpoint (`sharded/`) and the exported model is gathered on rank 0."""
    return accelerator.distributed_type == DistributedType.FSDP


def run_world(accelerator) -> memory_plan.World:
    """The run's processes, as the memory planner sees them: how many, and whether FSDP shards the model."""
    return memory_plan.World(accelerator.num_processes, is_sharded(accelerator))


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
        save_checkpoint(self.accelerator, self.model, self.tokenizer, self.optimizer, self.scheduler, self.state,
                        self.config, self.logger)

    def run_eval(self, step: int) -> dict:
        """The eval set's metrics (and gold accuracy) at `step`, added to the state's eval history and logged."""
        accelerator, config, data = self.accelerator, self.config, self.data
        start = time.perf_counter()
        record = {"step": step, **evaluate(self.model, self.reference, data.eval_examples, accelerator, config)}
        if config.gold_eval_samples and data.eval_rows is not None:
            sharded = is_sharded(accelerator)  # FSDP: every process must take part in each forward
            if sharded or accelerator.is_main_process:
                accuracy, answers = gold_accuracy(self.policy, self.tokenizer, data.eval_rows, data.eval_examples,
                                                  config, accelerator.device, synced=sharded)
                record["eval/gold_accuracy"] = accuracy
                for ex, answer in list(zip(data.eval_examples, answers))[:3]:
                    self.log(f"  step {step}: {gold_question(data.eval_rows[ex.index])!r} -> {answer.strip()!r}")
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
    state, resumed_from = resume_or_start(config, accelerator, model, optimizer, scheduler, data.train_fingerprint)
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
        if warning := gold_length_warning(tokenizer, eval_examples, config.gold_eval_samples,
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
    """(config, reference, model, optimizer, scheduler): the policy and its reference (taken before LoRA: the
    initial policy is the default reference), the PackedRPOModel around the policy and its optimizer, both
    prepared by accelerate, the scheduler; `config` has share_prompt off when the model cannot run it."""
    log = accelerator.print
    start = time.perf_counter()
    policy = build_policy(config, accelerator.device)
    config = resolve_share_prompt(config, policy, log)
    if accelerator.device.type == "cuda":
        log(memory_plan.forecast(config, policy.config, oom.device_memory_bytes(accelerator.device),
                                 run_world(accelerator)))
    splits = {"train": data.train_examples, **({"eval": data.eval_examples} if data.eval_examples else {})}
    reference = build_reference(config, policy, splits, accelerator, log)
    policy = finish_policy(policy, config)
    # Every process built the same weights from one seed; from here on each draws its own dropout masks (a
    # resumed run restores each process's RNG state instead).
    set_seed((config.seed + accelerator.process_index) % 2**32)
    if reference.mode == "adapter":
        reference.policy = policy
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
    if reference.mode == "adapter":
        reference.wrapped = model
    return config, reference, model, optimizer, scheduler


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
    weights = gathered_state_dict(accelerator, policy)  # under FSDP: a collective, the whole model on rank 0
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
