"""Smoke test of the overoptimization experiment (bench/overopt) on a tiny random-init model, plus its math."""
import csv
import json

import pytest
import torch

from bench.overopt import plot as overopt_plot
from bench.overopt.experiment import logp_metrics, make_variants
from bench.overopt.run import main
from tests.tiny_lm import build_tiny_model_dir


def test_logp_metrics_hand_values():
    base = {"s_c": torch.tensor([-10.0, -20.0]), "s_r": torch.tensor([-12.0, -18.0]),
            "n_c": torch.tensor([5.0, 10.0]), "n_r": torch.tensor([4.0, 9.0])}
    cur = {"s_c": torch.tensor([-9.0, -22.0]), "s_r": torch.tensor([-15.0, -19.0]),
           "n_c": base["n_c"], "n_r": base["n_r"]}
    m = logp_metrics(cur, base, beta=0.5)
    # log-ratio margins: (1 - (-3)) = 4 and (-2 - (-1)) = -1 -> beta * mean = 0.5 * 1.5
    assert m["eval/margin"] == pytest.approx(0.75)
    assert m["eval/reward_acc"] == pytest.approx(0.5)
    assert m["eval/logp_chosen"] == pytest.approx(-15.5)
    assert m["eval/logp_chosen_tok"] == pytest.approx((-9 / 5 - 22 / 10) / 2)
    assert m["eval/logp_rejected_tok"] == pytest.approx((-15 / 4 - 19 / 9) / 2)
    assert m["eval/logp_acc"] == pytest.approx(0.5)  # -9 > -15 yes, -22 > -19 no
    assert logp_metrics(base, base, 0.5)["eval/margin"] == 0.0


def test_variants_alpha_is_eta_times_beta():
    by_name = {v.name: v for v in make_variants(beta=0.1, eta=2.0)}
    assert by_name["dpo"].alpha == 0.0
    assert by_name["rpo_sum"].alpha == pytest.approx(0.2) and by_name["rpo_sum"].sft_norm == "sum"
    assert by_name["rpo_seq_mean"].alpha == pytest.approx(0.2) and by_name["rpo_seq_mean"].sft_norm == "seq_mean"
    assert by_name["rpo_sum_paper_eta"].alpha == pytest.approx(0.0005)


def _report(tmp_path, dpo_chosen: dict[int, list[float]]):
    """REPORT.md of hand-made rows: variants dpo and rpo_sum, seeds 0 and 1, held-out evals at steps 0, 5, 10
    (DPO's chosen log-prob per seed from `dpo_chosen`, rpo_sum's -20, -19, -18), training margins at steps 1-6."""
    from bench.overopt.experiment import Setup
    from bench.overopt.report import write_report

    rows = []
    for variant in ("dpo", "rpo_sum"):
        for seed in (0, 1):
            chosen = dpo_chosen[seed] if variant == "dpo" else [-20.0, -19.0, -18.0]
            for step, value in zip((0, 5, 10), chosen):
                for metric, v in (("eval/logp_chosen", value), ("eval/logp_chosen_tok", value / 10),
                                  ("eval/logp_rejected", -30.0), ("eval/margin", 0.0), ("eval/reward_acc", 0.5),
                                  ("eval/logp_acc", 0.5), ("eval/gold_acc", 0.25)):
                    rows.append({"variant": variant, "seed": seed, "step": step, "metric": metric, "value": v})
            margins = [1, 2, 3, 4, 5, 6] if seed == 0 else [0, 0, 0, 0, 2, 4]
            rows += [{"variant": variant, "seed": seed, "step": step, "metric": "train/margin", "value": m}
                     for step, m in zip(range(1, 7), margins)]
    setup = {k: v for k, v in vars(Setup()).items() if k != "extra"}
    meta = {"command": "python -m bench.overopt.run", "commit": "abc", "started": "now", "machine": "test",
            "setup": {**setup, "pairs_per_step": 4}, "eta": 1.0, "n_train": 8, "n_eval_logp": 3, "n_gold": 4,
            "variants": [{"name": v, "label": v, "sft_norm": "sum"} for v in ("dpo", "rpo_sum")],
            "runs": [{"variant": v, "seed": seed, "steps": 6, "mean_step_s": 1.0, "wall_s": 6.0, "eval_s": 1.0,
                      "gold_s": 1.0} for seed in (0, 1) for v in ("dpo", "rpo_sum")]}
    return write_report(rows, meta, tmp_path / "REPORT.md").read_text()


def test_report_verdicts_and_numbers_from_hand_made_rows(tmp_path):
    """Changes are last eval minus step 0 (not minus the first eval after it); claim 1 is reproduced only when DPO
    lowers the chosen log-prob on every seed; the training margin averages the last epoch (8 pairs / 4 per step =
    the last 2 steps), per seed."""
    report = _report(tmp_path, {0: [-20.0, -25.0, -22.0], 1: [-20.0, -19.0, -19.5]})
    # seed 0: -22 - -20 = -2 (from step 5: +3); seed 1: -19.5 - -20 = +0.5 (from step 5: -0.5)
    assert "DPO's held-out chosen log-prob change is -0.75 (-2.00, +0.50) nats -> mixed across seeds." in report
    # rpo_sum: +2 on both seeds; minus dpo: +4, +1.5
    assert "`rpo_sum` minus `dpo`, chosen log-prob change, same seeds: +2.75 (+4.00, +1.50) nats (higher" in report
    # the last 2 training margins: (5 + 6) / 2 = 5.5 and (2 + 4) / 2 = 3
    assert "averaged over the last 2 steps" in report and "`dpo` +4.25 (+5.50, +3.00)" in report
    report = _report(tmp_path, {0: [-20.0, -25.0, -22.0], 1: [-20.0, -23.0, -21.0]})
    assert "change is -1.50 (-2.00, -1.00) nats -> reproduced." in report
    report = _report(tmp_path, {0: [-20.0, -25.0, -19.0], 1: [-20.0, -23.0, -20.0]})
    assert "change is +0.50 (+1.00, +0.00) nats -> NOT reproduced." in report


def test_default_setup_config_validates_and_adapts_blocks_20_to_29(tmp_path):
    """`python -m bench.overopt.run` with no options: its LoRA target regex passes the config's validation unchanged
    and puts adapters on exactly the 7 projections of blocks 20-29 of a 30-block Llama (SmolLM2-135M's depth)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.overopt.experiment import Setup, train_config
    from rpo_fast import modeling

    setup = Setup()
    config = train_config(setup, make_variants(0.1, 1.0)[0], 0, tmp_path, setup.train_file)
    assert config.lora_target_modules == setup.lora_target_modules
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=30,
                                        num_attention_heads=2, num_key_value_heads=1))
    model = modeling.add_lora(tiny, r=2, alpha=4, dropout=0.0, target_modules=config.lora_target_modules)
    adapted = sorted(name.removeprefix("base_model.model.") for name, _ in model.named_modules()
                     if name.endswith(".lora_A"))
    assert adapted == sorted(f"model.layers.{i}.{part}.lora_A" for i in range(20, 30) for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"))


def test_quick_run_end_to_end(tmp_path):
    model_dir = build_tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "out"
    assert main(["--quick", "--model", str(model_dir), "--lora-target-modules", "all-linear", "--out", str(out),
                 "--work", str(tmp_path / "work"), "--seeds", "0", "--threads", "1", "--lr", "1e-2",
                 "--variants", "dpo", "rpo_sum"]) == 0
    with open(out / "overopt.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"variant", "seed", "step", "metric", "value"}
    variants = {r["variant"] for r in rows}
    assert variants == {"dpo", "rpo_sum"}
    final = {(r["variant"], r["metric"]) for r in rows if r["step"] == "4"}
    for v in variants:
        for metric in ("eval/logp_chosen", "eval/logp_chosen_tok", "eval/margin", "eval/reward_acc", "eval/gold_acc",
                       "train/loss"):
            assert (v, metric) in final
    step0 = {(r["variant"], r["metric"]): float(r["value"]) for r in rows if r["step"] == "0"}
    # step 0 is the base model for every variant; the margin against it is zero
    assert step0[("dpo", "eval/logp_chosen")] == step0[("rpo_sum", "eval/logp_chosen")]
    assert step0[("dpo", "eval/margin")] == 0.0
    after = {(r["variant"], r["metric"]): float(r["value"]) for r in rows if r["step"] == "4"}
    # same data, seed and steps: the variants part only through the SFT term
    assert after[("dpo", "eval/logp_chosen")] != after[("rpo_sum", "eval/logp_chosen")]
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["runs"]) == 2 and meta["n_train"] == 16
    assert (out / "overopt.png").stat().st_size > 10_000
    report = (out / "REPORT.md").read_text()
    assert "chosen log-prob change" in report and "dpo" in report
    assert "Each answer is shown stripped and cut to its first 60 characters" in report  # not cut silently

    # --resume with nothing missing keeps every row and runs nothing
    (out / "REPORT.md").write_text(report.replace("(to be written after looking at the figure)", "kept"))
    assert main(["--quick", "--model", str(model_dir), "--lora-target-modules", "all-linear", "--out", str(out),
                 "--work", str(tmp_path / "work"), "--seeds", "0", "--threads", "1", "--lr", "1e-2",
                 "--variants", "dpo", "rpo_sum", "--resume"]) == 0
    with open(out / "overopt.csv", newline="") as f:
        assert list(csv.DictReader(f)) == rows
    assert len(json.loads((out / "meta.json").read_text())["runs"]) == 2
    assert "kept" in (out / "REPORT.md").read_text()  # the hand-written discussion survives a rewrite


def test_plot_labels_give_the_unit():
    labels = dict(overopt_plot.PANELS)
    assert "(nats)" in labels["eval/logp_chosen"] and "(nats)" in labels["eval/margin"]


def test_series_mean_and_band():
    rows = [{"variant": "dpo", "seed": s, "step": step, "metric": "m", "value": v}
            for s, step, v in ((0, 0, 1.0), (1, 0, 3.0), (0, 5, 2.0))]  # step 5 lacks seed 1: left out
    steps, mean, lo, hi = overopt_plot.series(rows, "dpo", "m")
    assert steps == [0] and mean == [2.0] and lo == [1.0] and hi == [3.0]


def test_recorded_commit_says_when_the_tree_differs_from_it(tmp_path, monkeypatch):
    """meta.json's commit is HEAD's hash, marked -dirty when tracked files were edited (the run measured code
    that no commit holds)."""
    import subprocess

    from bench.overopt import run

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-qm", "a")
    monkeypatch.setattr(run, "REPO", tmp_path)
    clean = run.git_commit()
    assert clean != "unknown" and not clean.endswith("-dirty")
    (tmp_path / "untracked.txt").write_text("b")  # untracked files are not the measured code
    assert run.git_commit() == clean
    (tmp_path / "f.txt").write_text("b")
    assert run.git_commit() == clean + "-dirty"
