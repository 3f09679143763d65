"""7B RPO memory modes on one GPU: peak memory, tokens/s and the planner's prediction, as one CSV.

    python bench/gpu_7b.py OUT_DIR [--model mistral-7b] [--modes a,b,...]   # on an 80 GB GPU, ~3 min
    python bench/gpu_7b.py OUT_DIR --dry-run                                # tiny config on CPU, seconds

Builds a random-init model from a shipped config (no weights, no network) in bf16, then trains a few
RPO steps per mode on random tokens: 2 * pairs sequences of max_length tokens each, the first
prompt_tokens of each unscored. Sequences have equal length, so the batch is [2B, L] with causal
attention and no mask: sdpa's flash kernel, the memory of FlashAttention varlen (planner
attention="flash"). The first step allocates optimizer state; peaks (`torch.cuda.max_memory_allocated`)
and timings come from the following steps. A mode that runs out of memory or fails is recorded as
"oom" / "error" and the run goes on.

Modes (full fine-tuning: bf16 weights, gradient checkpointing, fused loss, precomputed reference):
    full_adamw_bf16               bf16 states, Kahan-compensated weights (the recommendation)
    full_adamw_bf16_compiled      the same, each chunk's update one torch.compile'd kernel
    full_adamw_bf16_in_backward   the same, stepped per parameter during backward
    full_adamw_bf16_sr            bf16 states, stochastically rounded weights
    full_adamw                    torch fused AdamW on bf16 weights (loses small updates)
    full_adamw8bit                bitsandbytes 8-bit AdamW (skipped without bitsandbytes)
    lora_24gb                     LoRA r=16 on all projections, reference = adapters disabled,
                                  under torch.cuda.set_per_process_memory_fraction(24 GiB)

Output: OUT_DIR/gpu_7b.csv, long format (bench, mode, metric, unit, x_name, x_value, p50, p20, p80,
config, gpu_name, timestamp, version) with metrics peak_memory, predicted_peak (GiB), tokens_per_s,
step_time (s); or one "skipped" / "oom" / "error" row with the reason in config.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rpo_fast import fused_linear_rpo_loss  # noqa: E402
from rpo_fast.memory_plan import GiB, LiveTensorTracker, load_model_config, plan_memory  # noqa: E402
from rpo_fast.optim import build_optimizer  # noqa: E402

FULL_MODES = {
    "full_adamw_bf16": dict(optimizer="adamw_bf16"),
    "full_adamw_bf16_compiled": dict(optimizer="adamw_bf16", compile=True),
    "full_adamw_bf16_in_backward": dict(optimizer="adamw_bf16_in_backward"),
    "full_adamw_bf16_sr": dict(optimizer="adamw_bf16_sr"),
    "full_adamw": dict(optimizer="adamw"),
    "full_adamw8bit": dict(optimizer="adamw8bit"),
}
LORA_MODE = "lora_24gb"
ALL_MODES = tuple(FULL_MODES) + (LORA_MODE,)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY_CONFIG = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                   tie_word_embeddings=False)
COLUMNS = ("bench", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80", "config", "gpu_name",
           "timestamp", "version")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory for gpu_7b.csv")
    parser.add_argument("--model", default="mistral-7b", help="shipped config name or config.json path")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs per micro-batch")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="unscored prompt tokens per sequence")
    parser.add_argument("--steps", type=int, default=4, help="steps per mode, the first one unmeasured")
    parser.add_argument("--modes", default=",".join(ALL_MODES), help=f"comma-separated subset of {ALL_MODES}")
    parser.add_argument("--lora-cap-gb", type=float, default=24.0, help="GiB cap of the LoRA mode")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny config on CPU (checks the script; peaks from LiveTensorTracker)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        parser.error(f"--modes: expected names from {ALL_MODES}, got {unknown}")
    if args.steps < 2:
        parser.error(f"--steps: expected >= 2 (one unmeasured), got {args.steps}")
    if not 0 <= args.prompt_tokens < args.max_length - 1:
        parser.error(f"--prompt-tokens: expected 0 <= prompt_tokens < max_length - 1, got {args.prompt_tokens}")
    args.modes = modes
    if args.dry_run:
        args.model, args.max_length, args.pairs, args.prompt_tokens, args.steps = TINY_CONFIG, 32, 2, 8, 2
    return args


def build_model(config, device: torch.device):
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
        except TypeError:  # transformers < 5 names it torch_dtype
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", torch_dtype=torch.bfloat16)
    return model.to(torch.bfloat16)


def enable_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def random_batch(vocab: int, pairs: int, length: int, prompt: int, device: torch.device):
    """ids [2B, L]; the flat rows of the scored positions, their targets, cu_seqlens over them."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    first = max(prompt - 1, 0)
    rows = (torch.arange(2 * pairs)[:, None] * length + torch.arange(first, length - 1)[None]).reshape(-1)
    targets = ids.reshape(-1)[rows + 1]
    cu = torch.arange(0, rows.numel() + 1, length - 1 - first, dtype=torch.int32)
    ref_logps = -torch.rand(2 * pairs, generator=gen) * (length - first)
    return [t.to(device) for t in (ids, rows, targets, cu, ref_logps)]


class Runner:
    """One training step of a mode, and the bookkeeping of peaks and timings."""

    def __init__(self, model, batch, impl: str, lora: bool):
        self.model, self.batch, self.impl, self.lora = model, batch, impl, lora
        self.base = model.get_base_model() if lora else model

    def step(self, optimizer) -> None:
        ids, rows, targets, cu, ref_logps = self.batch
        ref = dict(ref_logps=ref_logps)
        if self.lora:  # reference = the base model: adapters disabled, no graph
            with torch.no_grad(), self.model.disable_adapter():
                ref_hidden = self.base.model(input_ids=ids, use_cache=False).last_hidden_state
            ref = dict(ref_hidden=ref_hidden.reshape(-1, ref_hidden.shape[-1])[rows],
                       ref_weight=self.base.lm_head.weight)
            del ref_hidden
        hidden = self.base.model(input_ids=ids, use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        out = self._loss(hidden[rows], targets, cu, ref)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _loss(self, hidden, targets, cu, ref):
        try:
            return fused_linear_rpo_loss(hidden, self.base.lm_head.weight, targets, cu, beta=0.1, alpha=0.005 * 0.1,
                                         sft_norm="sum", impl=self.impl, **ref)
        except Exception as err:  # noqa: BLE001 - a missing or failing Triton build must not end the run
            if self.impl == "torch":
                raise
            print(f"loss impl {self.impl!r} failed ({type(err).__name__}: {err}); using 'torch'", file=sys.stderr)
            self.impl = "torch"
            return self._loss(hidden, targets, cu, ref)


def measure(runner: Runner, optimizer, steps: int, device: torch.device) -> tuple[int, list[float]]:
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
            tracker = LiveTensorTracker().track(runner.model, optimizer, *runner.batch)
            with tracker:
                runner.step(optimizer)
            peak = max(peak, tracker.peak)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    return peak, times


def release(model, optimizer=None) -> None:
    if optimizer is not None and hasattr(optimizer, "remove_hooks"):
        optimizer.remove_hooks()
    model.zero_grad(set_to_none=True)
    del optimizer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(args) -> list[dict]:
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_7b.py needs a CUDA GPU (or --dry-run)")
    if device.type == "cuda":
        _kernels_importable()
    config = load_model_config(args.model)
    gpu_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    version = _version()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    tokens = 2 * args.pairs * args.max_length
    model_name = args.model if isinstance(args.model, str) else "tiny-llama"
    rows: list[dict] = []

    def record(mode, metric, unit, values, settings):
        values = values if isinstance(values, list) else [values]
        rows.append(dict(bench="gpu_7b", mode=mode, metric=metric, unit=unit, x_name="tokens", x_value=tokens,
                         p50=round(statistics.median(values), 6), p20=round(_quantile(values, 0.2), 6),
                         p80=round(_quantile(values, 0.8), 6), config=json.dumps(settings, sort_keys=True),
                         gpu_name=gpu_name, timestamp=stamp, version=version))

    model = build_model(config, device)
    enable_checkpointing(model)
    model.train()
    batch = random_batch(config.vocab_size, args.pairs, args.max_length, args.prompt_tokens, device)
    impl = "torch" if device.type == "cpu" else "triton"
    full_runner = Runner(model, batch, impl, lora=False)
    for mode in [m for m in args.modes if m in FULL_MODES]:
        spec = dict(FULL_MODES[mode])
        compile_update = spec.pop("compile", False)
        settings = dict(model=model_name, mode="full_ft", dtype="bf16", gradient_checkpointing=True,
                        reference="precomputed", max_length=args.max_length, pairs=args.pairs,
                        prompt_tokens=args.prompt_tokens, compile=compile_update, **spec)
        skip = _skip_reason(mode, spec, compile_update, device)
        if skip:
            record(mode, "skipped", "", 1, dict(settings, reason=skip))
            continue
        optimizer, failure = None, None
        try:
            optimizer = build_optimizer(model, spec["optimizer"], lr=5e-7, weight_decay=0.0,
                                        compile=compile_update)
            peak, times = measure(full_runner, optimizer, args.steps, device)
        except Exception as err:  # noqa: BLE001 - one failing mode must not cost the others their GPU run
            failure = _failure(err)
        if failure:  # outside the except block, so the traceback's frames no longer hold tensors
            record(mode, failure[0], "", 1, dict(settings, reason=failure[1]))
            release(model, optimizer)
            continue
        settings["loss_impl"] = full_runner.impl
        plan = plan_memory(config, max_length=args.max_length, micro_batch_pairs=args.pairs,
                           prompt_tokens=args.prompt_tokens, optimizer=spec["optimizer"], reference="precomputed",
                           loss_impl=full_runner.impl, attention="flash", device=device.type)
        _record_mode(record, mode, settings, peak, times, tokens, plan)
        release(model, optimizer)

    if LORA_MODE in args.modes:
        settings = dict(model=model_name, mode="lora", lora_rank=args.lora_rank, lora_targets=list(LORA_TARGETS),
                        lora_dtype="fp32", dtype="bf16", gradient_checkpointing=True, reference="lora_disabled",
                        optimizer="adamw", max_length=args.max_length, pairs=args.pairs,
                        prompt_tokens=args.prompt_tokens, cap_gib=args.lora_cap_gb if total else None)
        _run_lora(model, batch, impl, args, device, total, settings, config, tokens, record)
    return rows


def _run_lora(model, batch, impl, args, device, total, settings, config, tokens, record):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        record(LORA_MODE, "skipped", "", 1, dict(settings, reason=f"peft missing: {err}"))
        return
    release(model)
    if total:  # everything but the bf16 weights is freed: the cap governs the rest
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.lora_cap_gb * GiB / total))
    failure = None
    try:
        peft_model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                      lora_dropout=0.0, target_modules=list(LORA_TARGETS)))
        peft_model.train()
        runner = Runner(peft_model, batch, impl, lora=True)
        optimizer = build_optimizer(peft_model, "adamw", lr=5e-6)
        peak, times = measure(runner, optimizer, args.steps, device)
    except Exception as err:  # noqa: BLE001 - recorded, as for the full fine-tuning modes
        failure = _failure(err)
    finally:
        if total:
            torch.cuda.set_per_process_memory_fraction(1.0)
    if failure:
        record(LORA_MODE, failure[0], "", 1, dict(settings, reason=failure[1]))
        return
    settings["loss_impl"] = runner.impl
    plan = plan_memory(config, max_length=args.max_length, micro_batch_pairs=args.pairs,
                       prompt_tokens=args.prompt_tokens, mode="lora", lora_rank=args.lora_rank,
                       lora_targets=LORA_TARGETS, optimizer="adamw", reference="lora_disabled",
                       loss_impl=runner.impl, attention="flash", device=device.type)
    _record_mode(record, LORA_MODE, settings, peak, times, tokens, plan)


def _record_mode(record, mode, settings, peak, times, tokens, plan):
    settings = dict(settings, planner_phase=plan.peak_phase,
                    planner_components_gib={k: round(v / GiB, 3) for k, v in plan.components.items()})
    record(mode, "peak_memory", "GiB", peak / GiB, settings)
    record(mode, "predicted_peak", "GiB", plan.peak_bytes / GiB, settings)
    record(mode, "step_time", "s", times, settings)
    record(mode, "tokens_per_s", "tokens/s", [tokens / t for t in times], settings)
    print(f"{mode:30s} peak {peak / 2**20:9.1f} MiB  predicted {plan.peak_bytes / 2**20:9.1f} MiB  "
          f"{tokens / statistics.median(times):9.0f} tokens/s", flush=True)


def _failure(err: Exception) -> tuple[str, str]:
    """("oom" | "error", a one-line reason); an unexpected error's traceback goes to stderr."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "oom", str(err).splitlines()[0][:300]
    traceback.print_exception(err)
    return "error", f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


def _skip_reason(mode, spec, compile_update, device) -> str | None:
    if spec["optimizer"].startswith("adamw8bit"):
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


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "gpu_7b.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
