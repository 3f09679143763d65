"""FSDP checkpoints end to end on 2 CPU processes (torchrun, gloo): a run killed after a committed checkpoint
and resumed ends with the same weights and optimizer state as an uninterrupted one, bit for bit; its sharded
state also resumes in 1 process (DCP reshards) when the micro-batches per step stay the same, and is refused
with what to do when they do not.

accelerate selects FSDP only for accelerator devices, so tests/fsdp_driver.py sets it on CPU processes (torch's
FSDP2 runs there over gloo); everything else is the trainer's own FSDP path. Each launch costs ~20 s on an
idle 2-core machine (imports and the tiny model), so the three launches run once for the module.
"""
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rpo_fast import checkpoint, modeling, resume, trainer
from rpo_fast.config import load_config
from test_ddp import free_port
from tiny_lm import REPO, build_tiny_model_dir, subprocess_env, tiny_overrides

STEPS = 4  # 16 pairs, 2 per micro-batch, 2 micro-batches per step; a checkpoint every 2 steps
DRIVER = Path(__file__).with_name("fsdp_driver.py")


def common(model_dir, tmp, **extra):
    return tiny_overrides(model_dir, tmp, finetune="full", reference="model", max_pairs_per_micro_batch=2,
                          eval_file="none", sft_norm="sum", save_every=2, keep_checkpoints=STEPS, **extra)


def launch_fsdp(overrides: dict, tmp: Path, kill_at: int = 0, timeout: float = 600) -> subprocess.CompletedProcess:
    (tmp / "overrides.json").write_text(json.dumps(overrides))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(DRIVER), str(tmp / "overrides.json"), str(kill_at)]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def fsdp_and_one_process(overrides, tmp: Path, timeout: float = 600) -> tuple[dict, dict]:
    """The exported weights of a 2-process FSDP run and of one process accumulating the same micro-batches
    (gradient_accumulation_steps 2). `overrides(folder, **extra)` -> the config values of a run in `folder`."""
    (tmp / "fsdp").mkdir()
    run = launch_fsdp(overrides(tmp / "fsdp"), tmp / "fsdp", timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "distributed type DistributedType.FSDP" in run.stdout
    (tmp / "one").mkdir()
    trainer.train(load_config(None, overrides(tmp / "one", gradient_accumulation_steps=2)))
    return weights(tmp / "fsdp" / "run"), weights(tmp / "one" / "run")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny model, an uninterrupted FSDP run, and one killed at the end of step 3 (its step-2 checkpoint
    committed) then resumed to the end."""
    root = tmp_path_factory.mktemp("fsdp")
    model_dir = build_tiny_model_dir(root / "tiny")
    (root / "whole").mkdir()
    whole = launch_fsdp(common(model_dir, root / "whole"), root / "whole")
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    assert "distributed type DistributedType.FSDP, steps 4" in whole.stdout

    (root / "killed").mkdir()
    overrides = common(model_dir, root / "killed", resume=True)
    killed = launch_fsdp(overrides, root / "killed", kill_at=3)
    assert killed.returncode != 0 and f"exitcode: -{int(signal.SIGKILL)}" in killed.stderr, killed.stderr[-3000:]
    latest = checkpoint.latest_checkpoint(root / "killed" / "run")
    assert latest is not None and latest.name == "step-000002", latest
    shutil.copytree(latest, root / "step2")  # as the kill left it, for the 1-process resumes
    resumed = launch_fsdp(overrides, root / "killed")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    return root, model_dir


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "model" / "model.safetensors")


def sharded_state(directory: Path, model_dir: Path, config) -> tuple[dict, dict]:
    """(parameters, optimizer state_dict) of a checkpoint's sharded state, loaded into one unsharded process."""
    model = modeling.PackedRPOModel(modeling.load_causal_lm(str(model_dir)).requires_grad_(True))
    optimizer, _ = trainer.build_optimizer(model, config, STEPS)
    checkpoint.load_sharded(model, optimizer, directory / checkpoint.SHARDED)
    return model.state_dict(), optimizer.state_dict()


def test_sharded_checkpoint_layout(runs):
    root, _ = runs
    step2 = root / "step2"
    assert checkpoint.is_complete(step2)
    manifest = json.loads((step2 / checkpoint.MARKER).read_text())["files"]
    # every rank's shard and the DCP metadata are under the manifest: a torn one is never picked up
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= set(manifest)
    assert not (step2 / "optimizer.pt").exists() and (step2 / "model" / "model.safetensors").is_file()
    assert resume.saved_world_size(step2) == 2


def test_killed_and_resumed_fsdp_run_equals_uninterrupted(runs):
    root, model_dir = runs
    expected, got = weights(root / "whole" / "run"), weights(root / "killed" / "run")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), f"{name}: max diff {(got[name] - tensor).abs().max()}"
    initial = load_file(model_dir / "model.safetensors")
    assert any(not torch.equal(t, initial[k]) for k, t in expected.items() if k in initial)  # training moved them

    config = load_config(None, common(model_dir, root / "whole"))
    final = checkpoint.step_dir_name(STEPS)
    params_a, optim_a = sharded_state(root / "whole" / "run" / "checkpoints" / final, model_dir, config)
    params_b, optim_b = sharded_state(root / "killed" / "run" / "checkpoints" / final, model_dir, config)
    assert optim_a["state"] and optim_a["state"].keys() == optim_b["state"].keys()
    for index, state in optim_a["state"].items():
        for key, value in state.items():
            assert torch.equal(optim_b["state"][index][key], value), (index, key)
    for name, param in params_a.items():
        assert torch.equal(params_b[name], param), name
    # the sharded state is the exported model's: the gathered checkpoint weights equal the resharded ones
    exported = weights(root / "whole" / "run" / "checkpoints" / final)
    for name, tensor in exported.items():
        assert torch.equal(params_a["model." + name], tensor), name


def test_fsdp_equals_one_process_accumulating(runs, tmp_path):
    """2 FSDP processes x 1 micro-batch = 1 process x 2 accumulated micro-batches, up to float rounding."""
    root, model_dir = runs
    one = load_config(None, common(model_dir, tmp_path, gradient_accumulation_steps=2))
    trainer.train(one)
    expected, got = weights(tmp_path / "run"), weights(root / "whole" / "run")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_fsdp_checkpoint_resumes_in_one_process_with_the_same_step(runs, tmp_path):
    """World size 2 -> 1: DCP reshards the state; gradient_accumulation_steps 2 keeps the batch plan."""
    root, model_dir = runs
    config = load_config(None, common(model_dir, tmp_path, gradient_accumulation_steps=2, resume=True))
    shutil.copytree(root / "step2", checkpoint.checkpoint_root(config.output_dir) / "step-000002")
    result = trainer.train(config)
    assert result.state.step == STEPS
    expected, got = weights(root / "whole" / "run"), weights(tmp_path / "run")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_resume_with_other_micro_batches_per_step_is_refused(runs, tmp_path):
    root, model_dir = runs
    config = load_config(None, common(model_dir, tmp_path, resume=True))  # 1 process x 1: half the step
    shutil.copytree(root / "step2", checkpoint.checkpoint_root(config.output_dir) / "step-000002")
    with pytest.raises(ValueError, match=r"2 process\(es\) x gradient_accumulation_steps=1 = 2 micro-batches.*"
                                         r"resume with gradient_accumulation_steps=2.*--model="):
        trainer.train(config)
