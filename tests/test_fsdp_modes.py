"""Training modes under FSDP2 beyond full fine-tuning (2 CPU processes, torchrun, gloo; ~20 s per launch).

A sharded model's forward is a collective: each FSDP unit gathers its weights from every rank in its forward
hook, the root unit (embeddings, final norm, head) in the wrapped model's. So every process must take part in
each forward (the gold-rule generations), and the adapter-off reference must run through the wrapped model.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from rpo_fast.config import load_config
from rpo_fast.trainer import train
from test_fsdp_resume import fsdp_and_one_process, launch_fsdp
from tiny_lm import build_tiny_model_dir, load_json_lines, tiny_overrides, write_rows


def test_eval_and_gold_generations_under_fsdp(tmp_path):
    """5 eval pairs, 2 per micro-batch: 3 micro-batches, 2 on one process and 1 on the other, whose forwards
    must still pair up (the one with fewer repeats one, unused); the eval metrics are 1 process's."""
    model_dir = build_tiny_model_dir(tmp_path / "tiny")
    (tmp_path / "run").mkdir()
    eval_file = write_rows(tmp_path / "eval5.jsonl", 5, "eval")
    overrides = tiny_overrides(model_dir, tmp_path / "run", sft_norm="sum", eval_every=2, gold_eval_samples=2,
                               gold_max_new_tokens=4, eval_file=str(eval_file))
    run = launch_fsdp(overrides, tmp_path / "run", timeout=240)  # a hang fails here, not after 10 minutes
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "distributed type DistributedType.FSDP" in run.stdout
    evals = [r for r in load_json_lines(tmp_path / "run" / "run" / "metrics.jsonl") if "eval/gold_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2, 4], json.dumps(evals)[:2000]

    (tmp_path / "one").mkdir()  # the step-0 eval (the initial model) of one process
    train(load_config(None, tiny_overrides(model_dir, tmp_path / "one", sft_norm="sum", max_steps=1,
                                           eval_file=str(eval_file))))
    one = next(r for r in load_json_lines(tmp_path / "one" / "run" / "metrics.jsonl") if r.get("step") == 0)
    for key in ("eval/loss", "eval/rewards/margins", "eval/nll", "eval/logps/chosen"):
        assert evals[0][key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


def test_lora_with_the_adapter_reference_under_fsdp_equals_one_process(tmp_path):
    """2 FSDP processes x 1 micro-batch = 1 process x 2 accumulated micro-batches; the merged LoRA weights."""
    model_dir = build_tiny_model_dir(tmp_path / "tiny")
    sharded, one = fsdp_and_one_process(
        lambda folder, **extra: tiny_overrides(model_dir, folder, eval_file="none", sft_norm="sum", finetune="lora",
                                               reference="adapter", save_every=0, **extra), tmp_path, timeout=240)
    initial = load_file(model_dir / "model.safetensors")
    assert sharded.keys() == one.keys()
    assert any(not torch.equal(one[k], t) for k, t in initial.items() if k in one)  # the merged LoRA moved them
    for name, tensor in one.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
