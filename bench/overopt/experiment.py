"""One experiment run: variants x seeds through `rpo_fast.trainer.train`, evaluated by a step hook.

Evaluation happens inside `TrainHooks.on_step_end` (the trainer's own `eval_every` reports only
summed log-probs and fixes the gold sample to its config), and step 0 is evaluated once on the base
model: LoRA starts with B = 0, so every variant's policy at step 0 *is* the base model.

Metrics per evaluation point, means over the held-out pairs (long format: variant, seed, step, metric,
value):
    eval/logp_chosen, eval/logp_rejected          summed response log-probs (nats)
    eval/logp_chosen_tok, eval/logp_rejected_tok  the same per response token
    eval/margin                                   beta * ((s_c - s_c^0) - (s_r - s_r^0)), s^0 = base model
    eval/reward_acc                               fraction of pairs with margin > 0 (0 at step 0 by definition)
    eval/logp_acc                                 fraction with s_c > s_r (the policy itself prefers chosen)
    eval/gold_acc                                 greedy answers to eval prompts judged by rpo_fast.gold
and per training step: train/loss, train/margin, train/reward_acc, train/logp_chosen, train/step_time_s.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rpo_fast import gold_eval, modeling, trainer
from rpo_fast.config import load_config
from rpo_fast.data import load_preference_rows, tokenize_pairs
from rpo_fast.loss import fused_linear_rpo_loss
from rpo_fast.packing import batch_by_token_budget, pack_pairs

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    alpha: float  # weight of the SFT term; 0 = plain DPO
    sft_norm: str = "sum"


def make_variants(beta: float, eta: float, eta_paper: float = 0.005, include_paper: bool = True) -> list[Variant]:
    """DPO, RPO-sum and RPO-seq_mean at alpha = eta * beta, and RPO-sum at the paper's eta (optional)."""
    variants = [Variant("dpo", "DPO (alpha=0)", 0.0),
                Variant("rpo_sum", f"RPO sum (eta={eta:g}, alpha={eta * beta:g})", eta * beta, "sum"),
                Variant("rpo_seq_mean", f"RPO seq_mean (alpha={eta * beta:g})", eta * beta, "seq_mean")]
    if include_paper:
        variants.append(Variant("rpo_sum_paper_eta", f"RPO sum, paper eta={eta_paper:g} (alpha={eta_paper * beta:g})",
                                eta_paper * beta, "sum"))
    return variants


@dataclass
class Setup:
    """Everything a run needs besides the variant and seed."""

    model: str = modeling.SMOLLM2
    train_file: str = str(REPO / "data" / "train.jsonl")
    eval_file: str = str(REPO / "data" / "eval.jsonl")
    train_pairs: int = 0  # first n training rows; 0 = all
    eval_pairs: int = 0  # first n eval pairs for the log-prob metrics; 0 = all
    gold_samples: int = 70  # first n eval prompts for the gold accuracy; 0 = off
    gold_max_new_tokens: int = 32  # the longest chosen answer of data/eval.jsonl takes 27 (SmolLM2's tokens)
    pairs_per_step: int = 4
    num_epochs: int = 3
    max_steps: int = 0
    eval_every: int = 10
    gold_every: int = 20
    beta: float = 0.1
    learning_rate: float = 5e-4
    warmup_steps: int = 5
    lr_scheduler: str = "constant"
    lora_r: int = 16
    lora_alpha: float = 32.0
    # LoRA on every linear layer of the top 10 of SmolLM2-135M's 30 blocks: backward stops at block 20,
    # which makes a step ~40% cheaper on the CPU than LoRA everywhere.
    lora_target_modules: str = r".*layers\.(2[0-9])\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    max_length: int = 128
    max_prompt_length: int = 96
    extra: dict = dataclasses.field(default_factory=dict)  # further TrainConfig overrides (tests)


def train_config(setup: Setup, variant: Variant, seed: int, work: Path, train_file: str):
    values = dict(
        model=setup.model, finetune="lora", lora_r=setup.lora_r, lora_alpha=setup.lora_alpha,
        lora_target_modules=setup.lora_target_modules, reference="cache", ref_cache_dir=str(work / "ref_cache"),
        train_file=train_file, eval_file=None, max_length=setup.max_length, max_prompt_length=setup.max_prompt_length,
        token_budget=4096, max_pairs_per_micro_batch=setup.pairs_per_step, gradient_accumulation_steps=1,
        beta=setup.beta, alpha=variant.alpha, sft_norm=variant.sft_norm, loss_type="sigmoid",
        learning_rate=setup.learning_rate, lr_scheduler=setup.lr_scheduler, warmup_steps=setup.warmup_steps,
        num_epochs=setup.num_epochs, max_steps=setup.max_steps, seed=seed, max_grad_norm=1.0,
        output_dir=str(work / f"{variant.name}-seed{seed}"), overwrite=True, save_every=0, keep_checkpoints=1,
        progress=False, plot=False, tensorboard=False, log_every=1000000,
        gold_max_new_tokens=setup.gold_max_new_tokens,
    )
    values.update(setup.extra)
    return load_config(None, values)


# --- evaluation -------------------------------------------------------------------------------------------------


@torch.no_grad()
def sequence_logps(model, examples) -> dict[str, torch.Tensor]:
    """Summed response log-probs and token counts of each eval pair, in `examples` order: four [n] float64."""
    was_training = model.training
    model.eval()
    parts = {"s_c": [], "s_r": [], "n_c": [], "n_r": []}
    for group in batch_by_token_budget(examples, 4096, max_pairs=16, shuffle=False, seed=0, epoch=0):
        batch = pack_pairs([examples[i] for i in group])
        hidden = modeling.response_hidden(model, batch)
        weight, bias = modeling.head(model)
        out = fused_linear_rpo_loss(hidden, weight, batch.targets, batch.response_cu_seqlens, bias=bias,
                                    beta=0.1, alpha=0.0, impl="torch")
        for key, value in (("s_c", out.chosen_logps), ("s_r", out.rejected_logps),
                           ("n_c", out.chosen_token_counts), ("n_r", out.rejected_token_counts)):
            parts[key].append(value.double())
    model.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items()}


def logp_metrics(cur: dict, base: dict, beta: float) -> dict[str, float]:
    margin = beta * ((cur["s_c"] - base["s_c"]) - (cur["s_r"] - base["s_r"]))
    return {
        "eval/logp_chosen": cur["s_c"].mean().item(),
        "eval/logp_rejected": cur["s_r"].mean().item(),
        "eval/logp_chosen_tok": (cur["s_c"] / cur["n_c"]).mean().item(),
        "eval/logp_rejected_tok": (cur["s_r"] / cur["n_r"]).mean().item(),
        "eval/margin": margin.mean().item(),
        "eval/reward_acc": (margin > 0).double().mean().item(),
        "eval/logp_acc": (cur["s_c"] > cur["s_r"]).double().mean().item(),
    }


def gold_accuracy(model, tokenizer, eval_rows, eval_examples, config, samples: int) -> tuple[float, list[str]]:
    """(fraction correct, generated answers) of the first `samples` eval prompts, via the trainer's check."""
    cfg = dataclasses.replace(config, gold_eval_samples=samples)
    result = gold_eval.gold_accuracy(model, tokenizer, eval_rows, eval_examples, cfg, torch.device("cpu"))
    return result if isinstance(result, tuple) else (result, [])  # older trainer: the fraction alone


# --- the run ----------------------------------------------------------------------------------------------------


def _rows(variant: str, seed: int, step: int, metrics: dict) -> list[dict]:
    return [{"variant": variant, "seed": seed, "step": step, "metric": k, "value": float(v)}
            for k, v in metrics.items()]


class Experiment:
    """Loads data and the base model once; `run(variant, seed)` trains one policy and returns long rows."""

    def __init__(self, setup: Setup, work: Path, log=print):
        self.setup, self.work, self.log = setup, Path(work), log
        self.work.mkdir(parents=True, exist_ok=True)
        rows = load_preference_rows(setup.train_file)
        if setup.train_pairs:
            rows = rows[:setup.train_pairs]
        self.train_file = str(self.work / "train.jsonl")
        Path(self.train_file).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        self.n_train = len(rows)
        self.tokenizer = modeling.load_tokenizer(*modeling.resolve_model_source(setup.model))
        self.eval_rows = load_preference_rows(setup.eval_file)
        self.eval_examples, stats = tokenize_pairs(self.eval_rows, self.tokenizer, max_length=setup.max_length,
                                                   max_prompt_length=setup.max_prompt_length, source=setup.eval_file)
        self.log(f"eval: {stats}")
        n = setup.eval_pairs or len(self.eval_examples)
        self.logp_examples = self.eval_examples[:n]
        self.gold_samples = min(setup.gold_samples, len(self.eval_examples))
        if warning := gold_eval.gold_length_warning(self.tokenizer, self.eval_examples, self.gold_samples,
                                                    setup.gold_max_new_tokens):
            self.log(warning)

    def baseline(self, config) -> dict:
        """Step 0 (the base model, shared by every variant and seed): reference log-probs and metrics."""
        t0 = time.perf_counter()
        base_model = modeling.load_causal_lm(config.model, config.gguf_file, dtype=config.dtype)
        self.base = sequence_logps(base_model, self.logp_examples)
        metrics = logp_metrics(self.base, self.base, self.setup.beta)
        if self.gold_samples:
            metrics["eval/gold_acc"], self.step0_answers = gold_accuracy(
                base_model, self.tokenizer, self.eval_rows, self.eval_examples, config, self.gold_samples)
        del base_model
        self.log(f"step 0 (base model): {_fmt(metrics)} [{time.perf_counter() - t0:.1f} s]")
        return metrics

    def run(self, variant: Variant, seed: int) -> tuple[list[dict], dict]:
        config = train_config(self.setup, variant, seed, self.work, self.train_file)
        if not hasattr(self, "base"):
            self.step0 = self.baseline(config)
        rows = _rows(variant.name, seed, 0, self.step0)
        train_examples, _ = tokenize_pairs(load_preference_rows(self.train_file), self.tokenizer,
                                           max_length=config.max_length, max_prompt_length=config.max_prompt_length)
        steps = trainer.total_steps(train_examples, config, 1)
        timing = {"eval_s": 0.0, "gold_s": 0.0}
        answers = {"step0": getattr(self, "step0_answers", [])}

        def on_step_end(step: int, record: dict, policy) -> None:
            rows.extend(_rows(variant.name, seed, step, {
                "train/loss": record["loss"], "train/margin": record["rewards/margins"],
                "train/reward_acc": record["rewards/accuracies"], "train/logp_chosen": record["logps/chosen"],
                "train/step_time_s": record["step_time_s"]}))
            last = step == steps
            if not (last or step % self.setup.eval_every == 0):
                return
            t0 = time.perf_counter()
            metrics = logp_metrics(sequence_logps(policy, self.logp_examples), self.base, self.setup.beta)
            timing["eval_s"] += time.perf_counter() - t0
            if self.gold_samples and (last or step % self.setup.gold_every == 0):
                t0 = time.perf_counter()
                metrics["eval/gold_acc"], texts = gold_accuracy(policy, self.tokenizer, self.eval_rows,
                                                                self.eval_examples, config, self.gold_samples)
                answers["final"] = texts
                timing["gold_s"] += time.perf_counter() - t0
            rows.extend(_rows(variant.name, seed, step, metrics))
            self.log(f"  {variant.name} seed {seed} step {step}/{steps}: {_fmt(metrics)}")

        t0 = time.perf_counter()
        trainer.train(config, trainer.TrainHooks(on_step_end=on_step_end))
        wall = time.perf_counter() - t0
        shutil.rmtree(config.output_dir, ignore_errors=True)  # the merged model (~0.5 GB) is not needed
        step_times = [r["value"] for r in rows if r["metric"] == "train/step_time_s"]
        info = {"variant": variant.name, "seed": seed, "steps": steps, "wall_s": wall,
                "mean_step_s": sum(step_times) / max(len(step_times), 1), **timing,
                "answers_step0": answers["step0"][:8], "answers_final": answers.get("final", [])[:8]}
        self.log(f"{variant.name} seed {seed}: {steps} steps in {wall:.0f} s "
                 f"({info['mean_step_s']:.2f} s/step, eval {timing['eval_s']:.0f} s, gold {timing['gold_s']:.0f} s)")
        return rows, info


def _fmt(metrics: dict) -> str:
    short = {"eval/logp_chosen": "logp_c", "eval/logp_rejected": "logp_r", "eval/margin": "margin",
             "eval/reward_acc": "acc", "eval/gold_acc": "gold"}
    return ", ".join(f"{short[k]} {v:.3g}" for k, v in metrics.items() if k in short)
