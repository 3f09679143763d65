"""Evaluation under FSDP2 (2 CPU processes, torchrun, gloo): the eval-set pass and the gold-rule generations.

A sharded model's forward is a collective (each layer gathers its weights from every rank), so a generation run
on the main process alone waits forever for the others; every process generates, with `synced_gpus`.
"""
import json

from test_fsdp_resume import launch_fsdp
from tiny_lm import build_tiny_model_dir, load_json_lines, tiny_overrides


def test_eval_and_gold_generations_under_fsdp(tmp_path):
    model_dir = build_tiny_model_dir(tmp_path / "tiny")
    (tmp_path / "run").mkdir()
    overrides = tiny_overrides(model_dir, tmp_path / "run", sft_norm="sum", eval_every=2, gold_eval_samples=2,
                               gold_max_new_tokens=4)
    run = launch_fsdp(overrides, tmp_path / "run", timeout=240)  # a hang fails here, not after 10 minutes
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "distributed type DistributedType.FSDP" in run.stdout
    evals = [r for r in load_json_lines(tmp_path / "run" / "run" / "metrics.jsonl") if "eval/gold_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2, 4], json.dumps(evals)[:2000]
