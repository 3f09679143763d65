"""7B RPO memory modes on one GPU, through the trainer's own step: peak memory, tokens/s and the planner's
prediction per mode, as one CSV and a markdown table.

    python bench/gpu_7b.py OUT_DIR [--model mistral-7b] [--modes a,b,...] [--budget-s S] [--summary PATH]
    python bench/gpu_7b.py OUT_DIR --dry-run         # tiny config on CPU, seconds
    bash bench/gpu_suite.sh OUT_DIR 7b               # the same inside the GPU suite (its `all` runs it too)

The measured step is the trainer's (`rpo_fast/trainer.py`: `run_step` and the loop around it). `--pairs`
synthetic preference pairs of random token ids, every sequence `--prompt-tokens` prompt tokens plus
`max_length - prompt_tokens` response tokens, are packed by `pack_pairs` into one row of
T = 2 * pairs * max_length tokens, N = 2 * pairs * (max_length - prompt_tokens) of them scored. The
policy is a random-init model built from a shipped config (no weights, no network) in bf16 with the
trainer's "rpo_varlen" attention (flash-attn or torch's varlen_attn on CUDA, per-sequence sdpa on CPU:
no mask, no kv repeat, planner attention="flash") and non-reentrant gradient checkpointing, wrapped in
`PackedRPOModel` (fused loss, sft_norm="sum"); then backward, gradient clipping, the optimizer step. The
reference is precomputed log-probs for full fine-tuning and, for LoRA, the policy with its adapters
disabled (as `trainer.Reference` in mode "adapter"). The first step allocates optimizer state (and
compiles); peaks (`torch.cuda.max_memory_allocated`; in a dry run the live tensor bytes of
`LiveTensorTracker`) and timings come from the following steps.

Modes, in the order they run (the most wanted first, so that a time budget cuts the least wanted):
    full_adamw_bf16               bf16 states, Kahan-compensated weights (the recommendation)
    lora_24gb                     LoRA r=16 on all projections (`modeling.add_lora`), reference = adapters
                                  disabled, under torch.cuda.set_per_process_memory_fraction(24 GiB)
    full_adamw_bf16_in_backward   bf16 states, Kahan, stepped per parameter during backward
    full_adamw_bf16_sr            bf16 states, stochastically rounded weights
    full_adamw                    torch fused AdamW on bf16 weights (loses small updates)
    full_adamw8bit                bitsandbytes 8-bit AdamW (skipped without bitsandbytes)
    full_adamw_bf16_compiled      adamw_bf16 with each chunk's update one torch.compile'd kernel (its first
                                  step compiles for tens of seconds: last)
Full fine-tuning: bf16 weights, every weight trainable, precomputed reference.

No failure ends the run. Out of memory is an "oom" row. Any other error on the packed path is an "error"
row, and the mode is tried once more on the plain path (this script's loop before it used the trainer's:
a [2B, L] batch of equal-length sequences, transformers' sdpa without a mask, `fused_linear_rpo_loss` on
the response rows; also planner attention="flash"), so that a torch without varlen attention still gives
memory figures. Every row's config says which path produced it ("path": "packed" | "plain"). With
--budget-s no mode (or retry) starts later than that many seconds after the process started; the modes
left get "skipped" rows with reason "time budget". The CSV is written row by row, so a SIGTERM (the
suite's hard limit) loses only the mode in flight; the summary is still written.

Output: OUT_DIR/gpu_7b.csv, long format (COLUMNS) with metrics peak_memory, predicted_peak (GiB),
tokens_per_s, step_time (s), or one "skipped" / "oom" / "error" row with the reason in config (a mode measured
while the planner raised: its measured rows and an "error" row, reason "planner: ..."). With
--summary PATH, a "## 7B memory modes" section (mode, path, peak, predicted, error, tokens/s, status) is
appended to PATH (created if missing).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gc
import json
import math
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

START = time.monotonic()  # the --budget-s clock starts with the process, as the suite's hard limit does
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rpo_fast import attention, fused_linear_rpo_loss, modeling  # noqa: E402
from rpo_fast.config import TrainConfig  # noqa: E402
from rpo_fast.data import PreferenceExample  # noqa: E402
from rpo_fast.live_memory import LiveTensorTracker  # noqa: E402
from rpo_fast.memory_plan import GiB, load_model_config, plan_memory  # noqa: E402
from rpo_fast.optim import build_optimizer, parse_mode  # noqa: E402
from rpo_fast.packing import PackedBatch, pack_pairs  # noqa: E402
from rpo_fast.trainer import Reference, finish_policy  # noqa: E402

FULL_MODES = {
    "full_adamw_bf16": dict(optimizer="adamw_bf16"),
    "full_adamw_bf16_in_backward": dict(optimizer="adamw_bf16_in_backward"),
    "full_adamw_bf16_sr": dict(optimizer="adamw_bf16_sr"),
    "full_adamw": dict(optimizer="adamw"),
    "full_adamw8bit": dict(optimizer="adamw8bit"),
    "full_adamw_bf16_compiled": dict(optimizer="adamw_bf16", compile=True),
}
LORA_MODE = "lora_24gb"
ALL_MODES = ("full_adamw_bf16", LORA_MODE, "full_adamw_bf16_in_backward", "full_adamw_bf16_sr", "full_adamw",
             "full_adamw8bit", "full_adamw_bf16_compiled")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY_CONFIG = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                   tie_word_embeddings=False)
COLUMNS = ("bench", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80", "config", "gpu_name",
           "timestamp", "version")
FAILURES = ("skipped", "oom", "error")
BETA, ALPHA = 0.1, 0.005 * 0.1  # the paper's eta = 0.005 as alpha = eta * beta
MAX_GRAD_NORM = 1.0  # the trainer's default clipping (in-backward modes cannot clip: inf)
SUMMARY_HEADING = "## 7B memory modes"
HARD_STOP = "hard time limit (SIGTERM)"
_sigterm_received = False  # set by the handler too: a HardStop raised inside a weakref callback is swallowed


class HardStop(BaseException):
    """SIGTERM arrived (the suite's hard time limit): not an Exception, so no mode records it as its error."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory for gpu_7b.csv")
    parser.add_argument("--model", default="mistral-7b", help="shipped config name or config.json path")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per sequence (prompt + response)")
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs per micro-batch")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="unscored prompt tokens per sequence")
    parser.add_argument("--steps", type=int, default=4, help="steps per mode, the first one unmeasured")
    parser.add_argument("--modes", default=",".join(ALL_MODES),
                        help=f"comma-separated subset of {ALL_MODES}, run in the order given")
    parser.add_argument("--lora-cap-gb", type=float, default=24.0, help="GiB cap of the LoRA mode")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no mode (or retry) after this many seconds since the process started; the "
                             "modes left are recorded as skipped")
    parser.add_argument("--summary", type=Path, default=None,
                        help=f"append a '{SUMMARY_HEADING}' markdown section to this file (created if missing)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny config on CPU (checks the script; peaks from LiveTensorTracker)")
    args = parser.parse_args(argv)
    modes = list(dict.fromkeys(m for m in args.modes.split(",") if m))
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown or not modes:
        parser.error(f"--modes: expected names from {ALL_MODES}, got {unknown or args.modes!r}")
    if args.steps < 2:
        parser.error(f"--steps: expected >= 2 (one unmeasured), got {args.steps}")
    if args.pairs < 1:
        parser.error(f"--pairs: expected >= 1, got {args.pairs}")
    if not 1 <= args.prompt_tokens < args.max_length:
        parser.error(f"--prompt-tokens: expected 1 <= prompt_tokens < max_length={args.max_length} (a packed "
                     f"sequence needs a prompt token before its first response token), got {args.prompt_tokens}")
    if args.lora_rank < 1:
        parser.error(f"--lora-rank: expected >= 1, got {args.lora_rank}")
    if args.budget_s is not None and args.budget_s < 0:
        parser.error(f"--budget-s: expected >= 0 seconds, got {args.budget_s}")
    args.modes = modes
    if args.dry_run:
        args.model, args.max_length, args.pairs, args.prompt_tokens, args.steps = TINY_CONFIG, 32, 2, 8, 2
    return args


# --- model, batches and the two step paths -----------------------------------------------------------------


def build_model(config, device: torch.device, attn_implementation: str):
    """A random-init causal LM of `config` in bf16 on `device` (no weights are read)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                     dtype=torch.bfloat16)
        except TypeError:  # transformers < 5 names it torch_dtype
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                     torch_dtype=torch.bfloat16)
    return model.to(torch.bfloat16)


def build_packed_model(config, device: torch.device):
    """(model, attention name): the trainer's "rpo_varlen", or transformers' "sdpa" (packed by position_ids,
    with a block mask) should registering it fail on this transformers."""
    try:
        return build_model(config, device, attention.register()), attention.ATTN_IMPLEMENTATION
    except Exception as err:  # noqa: BLE001 - the packed path then runs on sdpa and says so
        print(f"{attention.ATTN_IMPLEMENTATION!r} attention unavailable ({type(err).__name__}: {err}); "
              "building with 'sdpa'", file=sys.stderr, flush=True)
        return build_model(config, device, "sdpa"), "sdpa"


def synthetic_examples(vocab: int, pairs: int, length: int, prompt: int) -> list[PreferenceExample]:
    """`pairs` pairs of random token ids: a `prompt`-token prompt, chosen and rejected of `length - prompt`."""
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    return [PreferenceExample(prompt_ids=ids(prompt), chosen_ids=ids(length - prompt),
                              rejected_ids=ids(length - prompt), index=i) for i in range(pairs)]


def random_batch(vocab: int, pairs: int, length: int, prompt: int, device: torch.device):
    """The plain path's batch: ids [2B, L]; the flat rows of the scored positions [N], their targets [N],
    cu_seqlens over them [2B+1] int32, reference log-probs [2B]."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    first = max(prompt - 1, 0)
    rows = (torch.arange(2 * pairs)[:, None] * length + torch.arange(first, length - 1)[None]).reshape(-1)
    targets = ids.reshape(-1)[rows + 1]
    cu = torch.arange(0, rows.numel() + 1, length - 1 - first, dtype=torch.int32)
    ref_logps = -torch.rand(2 * pairs, generator=gen) * (length - first)
    return [t.to(device) for t in (ids, rows, targets, cu, ref_logps)]


class PackedRunner:
    """One training step as the trainer runs it (`trainer.run_step` and its loop) on one packed micro-batch.

    policy: the transformers model, or its peft LoRA wrapper (then the reference is its disabled adapters);
    batch: the PackedBatch of 2B sequences on the device; ref_logps: [2B] float32, the precomputed reference
    of full fine-tuning; max_grad_norm: the clipping norm (inf for the in-backward modes, as the trainer).
    """

    path = "packed"

    def __init__(self, policy, batch: PackedBatch, ref_logps: torch.Tensor, impl: str, lora: bool,
                 max_grad_norm: float):
        self.policy, self.batch, self.ref_logps, self.impl, self.lora = policy, batch, ref_logps, impl, lora
        self.max_grad_norm = max_grad_norm
        self.model = modeling.PackedRPOModel(policy, beta=BETA, alpha=ALPHA, sft_norm="sum", impl=impl)

    def tensors(self) -> list[torch.Tensor]:
        """What lives between steps besides the model and the optimizer (for LiveTensorTracker)."""
        fields = [getattr(self.batch, f.name) for f in dataclasses.fields(self.batch)]
        return [self.ref_logps, *(t for t in fields if isinstance(t, torch.Tensor))]

    def reference(self) -> dict:
        """`trainer.Reference.inputs`: the precomputed log-probs, or (LoRA) the head inputs of the policy with
        its adapters disabled, in eval mode, without a graph."""
        if not self.lora:
            return {"ref_logps": self.ref_logps}
        reference = Reference("adapter", policy=self.policy, wrapped=self.model)  # the trainer's path
        return reference.inputs(self.batch, "train", contextlib.nullcontext)

    def step(self, optimizer) -> None:
        ref = self.reference()  # alive until the step ends, as in run_step
        out = self.model(self.batch, **ref)
        out.loss.backward()  # one micro-batch per step: run_step's weight n_pairs / step_pairs is 1
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


class PlainRunner:
    """The fallback step: [2B, L] equal-length sequences, causal sdpa without a mask, the fused loss on the
    response rows (`random_batch`), and the optimizer step; no clipping."""

    path = "plain"

    def __init__(self, policy, batch, impl: str, lora: bool):
        self.model, self.batch, self.impl, self.lora = policy, batch, impl, lora

    def tensors(self) -> list[torch.Tensor]:
        return list(self.batch)

    def step(self, optimizer) -> None:
        ids, rows, targets, cu, ref_logps = self.batch
        ref = dict(ref_logps=ref_logps)
        if self.lora:  # reference = the base model: adapters disabled, no graph
            with torch.no_grad(), self.model.disable_adapter():
                ref_hidden = modeling.backbone(self.model)(input_ids=ids, use_cache=False).last_hidden_state
            ref = dict(ref_hidden=ref_hidden.reshape(-1, ref_hidden.shape[-1])[rows],
                       ref_weight=modeling.head(self.model)[0])
            del ref_hidden
        hidden = modeling.backbone(self.model)(input_ids=ids, use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        out = self._loss(hidden[rows], targets, cu, ref)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _loss(self, hidden, targets, cu, ref):
        try:
            return fused_linear_rpo_loss(hidden, modeling.head(self.model)[0], targets, cu, beta=BETA, alpha=ALPHA,
                                         sft_norm="sum", impl=self.impl, **ref)
        except Exception as err:  # noqa: BLE001 - a missing or failing Triton build must not end the run
            if self.impl == "torch":
                raise
            print(f"loss impl {self.impl!r} failed ({type(err).__name__}: {err}); using 'torch'", file=sys.stderr)
            self.impl = "torch"
            return self._loss(hidden, targets, cu, ref)


def prepare_policy(model, lora: bool, rank: int):
    """The trainer's `finish_policy`: LoRA adapters (else every weight trainable), then checkpointing."""
    config = TrainConfig(finetune="lora" if lora else "full", lora_r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                         lora_target_modules=list(LORA_TARGETS), gradient_checkpointing=True)
    return finish_policy(model, config)


def restore_model(model, policy) -> None:
    """Undoes `prepare_policy`: the LoRA layers out (base weights untouched), checkpointing off, so the next
    mode starts from the plain model as the trainer does."""
    if policy is not model:
        policy.unload()
    lm = modeling.base_model(model)
    disable = getattr(lm, "activation_checkpointing_disable", None) or lm.gradient_checkpointing_disable
    disable()


@contextlib.contextmanager
def plain_attention(model):
    """transformers' own "sdpa" for the plain path, independent of rpo_fast.attention (restored after)."""
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation("sdpa")
    except Exception as err:  # noqa: BLE001 - "rpo_varlen" runs a [2B, L] batch as plain causal sdpa anyway
        print(f"could not switch to 'sdpa' ({type(err).__name__}: {err}); the plain path keeps {previous!r}",
              file=sys.stderr, flush=True)
        yield
        return
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def measure(runner, optimizer, steps: int, device: torch.device) -> tuple[int, list[float]]:
    """(peak bytes over steps 2.., their wall times)."""
    runner.step(optimizer)  # allocates optimizer state (and compiles what compiles)
    times, peak = [], 0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps - 1):
        start = time.perf_counter()
        if device.type == "cuda":
            runner.step(optimizer)
            torch.cuda.synchronize()
        else:
            tracker = LiveTensorTracker().track(runner.model, optimizer, *runner.tensors())
            with tracker:
                runner.step(optimizer)
            peak = max(peak, tracker.peak)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    return peak, times


def collect_garbage() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pick_loss_impl(device: torch.device) -> str:
    """"torch" on CPU; on CUDA "triton" when the fused kernels run a tiny forward and backward, else "torch"."""
    if device.type != "cuda":
        return "torch"
    _kernels_importable()
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(64, 128, device=device, dtype=torch.bfloat16, generator=gen, requires_grad=True)
        weight = torch.randn(1000, 128, device=device, dtype=torch.bfloat16, generator=gen, requires_grad=True)
        targets = torch.randint(0, 1000, (64,), device=device, generator=gen)
        cu = torch.tensor([0, 16, 32, 48, 64], dtype=torch.int32, device=device)
        fused_linear_rpo_loss(hidden, weight, targets, cu, beta=BETA, alpha=ALPHA, sft_norm="sum",
                              impl="triton").loss.backward()
        torch.cuda.synchronize()
        return "triton"
    except Exception as err:  # noqa: BLE001 - the loss then runs chunked in torch, and the CSV says so
        print(f"loss impl 'triton' failed a tiny check ({type(err).__name__}: {err}); using 'torch'",
              file=sys.stderr, flush=True)
        return "torch"


# --- the run -----------------------------------------------------------------------------------------------


class Bench:
    """One run: the shared model and batches, the CSV rows (written as they come) and the loop over modes."""

    def __init__(self, args: argparse.Namespace, writer: csv.DictWriter | None = None, file=None):
        self.args, self.writer, self.file = args, writer, file
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("gpu_7b.py needs a CUDA GPU (or --dry-run)")
        self.gpu_name = torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu (dry run)"
        self.total = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" \
            else None
        self.version = _version()
        self.stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.tokens = 2 * args.pairs * args.max_length
        self.model_name = args.model if isinstance(args.model, str) else "tiny-llama"
        self.deadline = None if args.budget_s is None else START + args.budget_s
        self.rows: list[dict] = []
        self.stopped = False  # by SIGTERM

    # -- rows

    def record(self, mode: str, metric: str, unit: str, values, settings: dict) -> None:
        values = values if isinstance(values, list) else [values]
        row = dict(bench="gpu_7b", mode=mode, metric=metric, unit=unit, x_name="tokens", x_value=self.tokens,
                   p50=round(statistics.median(values), 6), p20=round(_quantile(values, 0.2), 6),
                   p80=round(_quantile(values, 0.8), 6), config=json.dumps(settings, sort_keys=True),
                   gpu_name=self.gpu_name, timestamp=self.stamp, version=self.version)
        self.rows.append(row)
        if self.writer is not None:
            self.writer.writerow(row)
            self.file.flush()

    def record_failure(self, mode: str, path: str, status: str, reason: str, settings: dict) -> None:
        self.record(mode, status, "", 1, dict(settings, path=path, reason=reason))
        self.progress(mode, path, f"{status}: {reason}")

    def progress(self, mode: str, path: str, text: str) -> None:
        print(f"[{time.monotonic() - START:5.0f}s] {mode:28s} {path:6s} {text}", flush=True)

    def stop_reason(self) -> str | None:
        """Why nothing new may start now: HARD_STOP (SIGTERM came), "time budget" (--budget-s spent), or None."""
        if _sigterm_received:
            self.stopped = True
            return HARD_STOP
        if self.deadline is not None and time.monotonic() > self.deadline:
            return "time budget"
        return None

    # -- the loop

    def run(self) -> None:
        """Runs every mode of `args.modes` in order; a SIGTERM (HardStop) records the modes left as skipped."""
        modes = self.args.modes
        try:
            if reason := self.stop_reason():  # nothing would start: spare the model build
                for mode in modes:
                    self.record_failure(mode, "packed", "skipped", reason, self.settings(mode, "packed"))
                return
            try:
                self.setup()
            except Exception as err:  # noqa: BLE001 - the CSV says why nothing ran
                status, reason = _failure(err)
                for mode in modes:
                    self.record_failure(mode, "packed", status, f"setup: {reason}", self.settings(mode, "packed"))
                return
            for mode in modes:
                if reason := self.stop_reason():
                    self.record_failure(mode, "packed", "skipped", reason, self.settings(mode, "packed"))
                    continue
                try:
                    self.run_mode(mode)
                except Exception as err:  # noqa: BLE001 - e.g. recording a measured mode broke: the rest still run
                    self.record_failure(mode, "packed", *_failure(err), self.settings(mode, "packed"))
        except HardStop:
            self.stopped = True
            done = {r["mode"] for r in self.rows}
            for mode in (m for m in modes if m not in done):
                self.record_failure(mode, "packed", "skipped", HARD_STOP, self.settings(mode, "packed"))

    def setup(self) -> None:
        args = self.args
        self.config = load_model_config(args.model)
        self.impl = pick_loss_impl(self.device)
        self.model, self.attention = build_packed_model(self.config, self.device)
        examples = synthetic_examples(self.config.vocab_size, args.pairs, args.max_length, args.prompt_tokens)
        self.packed = pack_pairs(examples).to(self.device)
        gen = torch.Generator().manual_seed(1)
        response = args.max_length - args.prompt_tokens
        self.ref_logps = (-torch.rand(2 * args.pairs, generator=gen) * response).to(self.device)
        self.plain = random_batch(self.config.vocab_size, args.pairs, args.max_length, args.prompt_tokens,
                                  self.device)
        assert self.packed.num_tokens == self.tokens == self.plain[0].numel()
        assert self.packed.num_response_tokens == self.plain[1].numel()  # both paths score the same N

    def settings(self, mode: str, path: str) -> dict:
        args = self.args
        common = dict(model=self.model_name, dtype="bf16", gradient_checkpointing=True, max_length=args.max_length,
                      pairs=args.pairs, prompt_tokens=args.prompt_tokens, path=path)
        if path == "plain":
            common.update(attention="sdpa", batch="[2B, L]")
        else:
            attn = getattr(self, "attention", attention.ATTN_IMPLEMENTATION)
            common.update(attention=attn, batch="packed")
            if attn == attention.ATTN_IMPLEMENTATION:
                common["attention_backend"] = attention.select_backend(self.device)
        if mode == LORA_MODE:
            return dict(common, mode="lora", lora_rank=args.lora_rank, lora_targets=list(LORA_TARGETS),
                        lora_dtype="fp32", reference="lora_disabled", optimizer="adamw",
                        cap_gib=args.lora_cap_gb if self.total else None)
        spec = FULL_MODES[mode]
        return dict(common, mode="full_ft", reference="precomputed", optimizer=spec["optimizer"],
                    compile=spec.get("compile", False))

    def run_mode(self, mode: str) -> None:
        """The packed path, then (after a non-OOM error, budget permitting) the plain path once."""
        lora = mode == LORA_MODE
        settings = self.settings(mode, "packed")
        skip = _skip_reason(settings["optimizer"], settings.get("compile", False), self.device)
        if skip:
            self.record_failure(mode, "packed", "skipped", skip, settings)
            return
        collect_garbage()
        if lora and self.total:  # everything but the bf16 weights is freed: the cap governs the rest
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.args.lora_cap_gb * GiB / self.total))
        policy = None
        try:
            try:
                policy = prepare_policy(self.model, lora, self.args.lora_rank)
            except Exception as err:  # noqa: BLE001 - e.g. peft missing: recorded like a failed step
                status, reason = ("skipped", f"peft missing: {err}") if isinstance(err, ImportError) \
                    else _failure(err)
                self.record_failure(mode, "packed", status, reason, settings)
                return
            status = self.attempt(mode, "packed", policy)
            if status == "error":
                if reason := self.stop_reason():
                    self.record_failure(mode, "plain", "skipped", reason, self.settings(mode, "plain"))
                else:
                    self.progress(mode, "plain", "retrying on the plain path")
                    self.attempt(mode, "plain", policy)
        finally:
            if policy is not None:
                restore_model(self.model, policy)
            if lora and self.total:
                torch.cuda.set_per_process_memory_fraction(1.0)
            collect_garbage()

    def attempt(self, mode: str, path: str, policy) -> str:
        """Measures one mode on one path and records it; returns "ok", "oom" or "error"."""
        settings = self.settings(mode, path)
        lora = mode == LORA_MODE
        optimizer_mode = settings["optimizer"]
        in_backward = parse_mode(optimizer_mode)[1]
        runner = optimizer = failure = None
        try:
            with plain_attention(self.model) if path == "plain" else contextlib.nullcontext():
                if path == "packed":
                    runner = PackedRunner(policy, self.packed, self.ref_logps, self.impl, lora,
                                          math.inf if in_backward else MAX_GRAD_NORM)
                else:
                    runner = PlainRunner(policy, self.plain, self.impl, lora)
                optimizer = build_optimizer(runner.model, optimizer_mode, lr=5e-6 if lora else 5e-7,
                                            weight_decay=0.0, compile=settings.get("compile", False),
                                            max_grad_norm=None if in_backward else MAX_GRAD_NORM)
                peak, times = measure(runner, optimizer, self.args.steps, self.device)
        except Exception as err:  # noqa: BLE001 - one failing mode must not cost the others their GPU run
            failure = _failure(err)
        impl = runner.impl if runner is not None else self.impl
        if optimizer is not None and hasattr(optimizer, "remove_hooks"):
            optimizer.remove_hooks()
        runner = optimizer = None
        policy.zero_grad(set_to_none=True)
        collect_garbage()
        if failure:  # recorded outside the except block, so the traceback's frames no longer hold tensors
            self.record_failure(mode, path, *failure, settings)
            return failure[0]
        settings["loss_impl"] = impl
        plan = planner_failure = None
        try:
            plan = self.plan(settings, impl)
            settings.update(planner_phase=plan.peak_phase, planner_attention=plan.options["attention"],
                            planner_components_gib={k: round(v / GiB, 3) for k, v in plan.components.items()})
        except Exception as err:  # noqa: BLE001 - the measurement stands without its prediction
            planner_failure = _failure(err)
        self.record(mode, "peak_memory", "GiB", peak / GiB, settings)
        if planner_failure is None:
            self.record(mode, "predicted_peak", "GiB", plan.peak_bytes / GiB, settings)
        self.record(mode, "step_time", "s", times, settings)
        self.record(mode, "tokens_per_s", "tokens/s", [self.tokens / t for t in times], settings)
        if planner_failure is not None:
            status, reason = planner_failure
            self.record_failure(mode, path, status, f"planner: {reason}", settings)
            return "ok"  # measured: no retry on the plain path
        self.progress(mode, path, f"peak {peak / 2**20:9.1f} MiB  predicted {plan.peak_bytes / 2**20:9.1f} MiB "
                                  f"({plan.peak_bytes / peak - 1:+.1%})  "
                                  f"{self.tokens / statistics.median(times):9.0f} tokens/s")
        return "ok"

    def plan(self, settings: dict, impl: str):
        """The planner's prediction for what ran: varlen attention and the plain path's unmasked causal sdpa
        both keep flash attention's tensors ("flash"); transformers' sdpa on a packed row adds its mask."""
        args = self.args
        lora = settings["mode"] == "lora"
        options = dict(mode="lora", lora_rank=args.lora_rank, lora_targets=LORA_TARGETS) if lora else {}
        return plan_memory(self.config, max_length=args.max_length, micro_batch_pairs=args.pairs,
                           prompt_tokens=args.prompt_tokens, optimizer=settings["optimizer"],
                           reference=settings["reference"], loss_impl=impl,
                           attention="sdpa" if settings["attention"] == "sdpa" and settings["path"] == "packed"
                           else "flash", device=self.device.type, **options)

    # -- the summary

    def summary_markdown(self) -> str:
        """The "## 7B memory modes" section: one table row per (mode, path) tried."""
        args = self.args
        results: dict[tuple[str, str], dict] = {}
        for row in self.rows:
            settings = json.loads(row["config"])
            entry = results.setdefault((row["mode"], settings["path"]), {})
            entry[row["metric"]] = float(row["p50"])
            if row["metric"] in FAILURES:
                entry["status"] = f"{row['metric']}: {settings['reason']}"
        lines = [SUMMARY_HEADING, ""]
        if args.dry_run:
            lines += ["**Dry run on CPU (tiny config): peaks are LiveTensorTracker's live tensor bytes; it checks "
                      "that the script runs, none of its numbers is a measurement.**", ""]
        lines += [f"`bench/gpu_7b.py` on {self.gpu_name}, {self.version}: {self.model_name} (random init, bf16), "
                  f"{args.pairs} pairs x {args.max_length} tokens ({args.prompt_tokens} prompt) = {self.tokens} "
                  f"packed tokens per step, {args.steps} steps per mode (the first unmeasured). Peak = "
                  f"`torch.cuda.max_memory_allocated`, predicted = `rpo-fast plan-memory`, error = predicted / "
                  "peak - 1. Path \"packed\" is the trainer's step, \"plain\" the fallback after a packed error "
                  "(see `bench/gpu_7b.py`). Rows: `gpu_7b.csv`.", ""]
        if self.stopped:
            lines += ["**Stopped by SIGTERM (the suite's hard time limit): the modes left are skipped.**", ""]
        lines += ["| mode | path | peak GiB | predicted GiB | error % | tokens/s | status |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for (mode, path), entry in results.items():
            peak, predicted = entry.get("peak_memory"), entry.get("predicted_peak")
            error = f"{100 * (predicted / peak - 1):+.1f}" if peak and predicted else ""
            speed = f"{entry['tokens_per_s']:.0f}" if "tokens_per_s" in entry else ""
            status = entry.get("status", "ok").replace("|", "/").replace("\n", " ")[:160]
            lines.append(f"| {mode} | {path} | {_gib(peak)} | {_gib(predicted)} | {error} | {speed} | {status} |")
        return "\n".join(lines) + "\n"


def _gib(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if value >= 1 else f"{value:.4f}"


def _failure(err: Exception) -> tuple[str, str]:
    """("oom" | "error", a one-line reason); an unexpected error's traceback goes to stderr."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "oom", str(err).splitlines()[0][:300]
    traceback.print_exception(err)
    return "error", f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


def _skip_reason(optimizer: str, compile_update: bool, device: torch.device) -> str | None:
    if optimizer.startswith("adamw8bit"):
        if device.type != "cuda":
            return "bitsandbytes 8-bit AdamW needs CUDA"
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "bitsandbytes not installed"
    if compile_update and device.type != "cuda":
        return "torch.compile of the update is a GPU speed mode (CPU compile is slow)"
    return None


def _quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _kernels_importable() -> None:
    """A plain checkout (as on a lent GPU machine) lacks the `rpo_fast.kernels` mapping of setup.py."""
    try:
        from bench import env

        env.ensure_kernels_importable()
    except Exception as err:  # noqa: BLE001 - the loss then falls back to impl="torch" and says so
        print(f"rpo_fast.kernels not importable ({type(err).__name__}: {err})", file=sys.stderr)


def _version() -> str:
    try:
        from bench import env

        return f"rpo-fast@{env.git_sha()};{env.versions()}"
    except Exception:  # noqa: BLE001 - metadata only
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import transformers

    return f"rpo-fast@{commit or 'unknown'} torch {torch.__version__} transformers {transformers.__version__}"


def _hard_stop(signum, frame):
    global _sigterm_received
    _sigterm_received = True
    raise HardStop()


def append_summary(path: Path, text: str) -> None:
    """Appends `text` as a section of the markdown file `path` (created, with its folder, if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = path.read_text(encoding="utf-8") if path.exists() else ""
    separator = "" if not previous else ("\n" if previous.endswith("\n") else "\n\n")
    with path.open("a", encoding="utf-8") as f:
        f.write(separator + text)


def main(argv=None) -> int:
    """Returns 0, 1 when nothing could be set up, 124 when stopped by SIGTERM."""
    args = parse_args(argv)
    if argv is None:  # run as a program, not from a test: the suite's `timeout` sends SIGTERM
        signal.signal(signal.SIGTERM, _hard_stop)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "gpu_7b.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        bench = Bench(args, writer, f)
        try:
            bench.run()
        finally:
            if args.summary is not None:
                append_summary(args.summary, bench.summary_markdown())
    print(f"wrote {len(bench.rows)} rows to {path}" + (f"; summary in {args.summary}" if args.summary else ""),
          flush=True)
    if bench.stopped:
        return 124
    return 1 if any("setup:" in json.loads(r["config"]).get("reason", "") for r in bench.rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
