"""Data parallelism: 2 processes (torchrun, gloo on the CPU) give the same per-step losses and final weights
as 1 process that accumulates the same global batch (2 micro-batches per step), and keep their gradients in
DDP's buckets."""
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rpo_fast.config import load_config
from rpo_fast.trainer import train
from tiny_lm import REPO, build_tiny_model_dir, load_json_lines, subprocess_env, tiny_overrides

TORCHRUN = Path(sys.executable).parent / "torchrun"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DRIVER = Path(__file__).with_name("ddp_driver.py")


def step_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in load_json_lines(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.skipif(not TORCHRUN.exists() or not torch.distributed.is_available(), reason="needs torchrun")
def test_two_processes_equal_one_process_with_accumulation(tmp_path):
    model_dir = build_tiny_model_dir(tmp_path / "tiny")
    common = dict(finetune="full", reference="model", max_pairs_per_micro_batch=2, num_epochs=1, eval_file="none",
                  sft_norm="sum")

    (tmp_path / "one").mkdir()
    one = load_config(None, tiny_overrides(model_dir, tmp_path / "one", gradient_accumulation_steps=2, **common))
    train(one)

    (tmp_path / "two").mkdir()
    two = tiny_overrides(model_dir, tmp_path / "two", gradient_accumulation_steps=1, **common)
    args = [f"--{k}={v}" for k, v in two.items()]
    cmd = [str(TORCHRUN), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "rpo_fast.cli", "train", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout

    losses_one, losses_two = step_losses(tmp_path / "one" / "run"), step_losses(tmp_path / "two" / "run")
    assert len(losses_one) == len(losses_two) == 4  # 16 pairs, 2 per micro-batch, 2 micro-batches per step
    torch.testing.assert_close(torch.tensor(losses_two), torch.tensor(losses_one), rtol=1e-5, atol=1e-6)
    w1 = load_file(tmp_path / "one" / "run" / "model" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "run" / "model" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")

    # the comparison can fail: 1 process with half the global batch ends elsewhere
    (tmp_path / "half").mkdir()
    half = load_config(None, tiny_overrides(model_dir, tmp_path / "half", gradient_accumulation_steps=1, **common))
    train(half)
    w_half = load_file(tmp_path / "half" / "run" / "model" / "model.safetensors")
    assert any((w_half[n] - w1[n]).abs().max() > 1e-4 for n in w1)
    shutil.rmtree(tmp_path / "tiny")


@pytest.mark.skipif(not TORCHRUN.exists() or not torch.distributed.is_available(), reason="needs torchrun")
def test_ddp_gradients_stay_bucket_views_through_accumulation(tmp_path):
    """Each process accumulates 2 micro-batches (the first under no_sync) into gradients that are views of DDP's
    buckets, zeroed in place between steps: no second gradient-sized copy. The result is 1 process's with 4."""
    model_dir = build_tiny_model_dir(tmp_path / "tiny")
    # the largest seed: process 1's own seed wraps around to 0
    common = dict(finetune="full", reference="model", max_pairs_per_micro_batch=2, num_epochs=1, eval_file="none",
                  sft_norm="token_mean", max_grad_norm=1.0, seed=2**32 - 1)

    (tmp_path / "one").mkdir()
    train(load_config(None, tiny_overrides(model_dir, tmp_path / "one", gradient_accumulation_steps=4, **common)))

    (tmp_path / "two").mkdir()
    overrides = tmp_path / "two" / "overrides.json"
    overrides.write_text(json.dumps(tiny_overrides(model_dir, tmp_path / "two", gradient_accumulation_steps=2,
                                                   **common)))
    cmd = [str(TORCHRUN), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(DRIVER), str(overrides)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):  # 16 pairs, 2 per micro-batch, 4 micro-batches per step: 2 steps
        assert f"rank {rank} (DistributedType.MULTI_CPU): gradients were bucket views at step ends [True, True]" \
            in proc.stdout, proc.stdout[-3000:]
    # one initialization, then each process its own dropout masks
    seeds = {int(seed) for seed in re.findall(r"training seed (\d+)", proc.stdout)}
    assert seeds == {2**32 - 1, 0}, proc.stdout[-3000:]

    losses_one, losses_two = step_losses(tmp_path / "one" / "run"), step_losses(tmp_path / "two" / "run")
    assert len(losses_one) == len(losses_two) == 2
    torch.testing.assert_close(torch.tensor(losses_two), torch.tensor(losses_one), rtol=1e-5, atol=1e-6)
    w1 = load_file(tmp_path / "one" / "run" / "model" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "run" / "model" / "model.safetensors")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


SIGNALLED_RANK = r'''
import json, os, signal, sys
from pathlib import Path

from accelerate.state import PartialState

from rpo_fast import trainer
from rpo_fast.config import load_config


def on_step_end(step, record, policy):
    if step == 2 and PartialState().process_index == 1:  # only one process gets the signal
        os.kill(os.getpid(), signal.SIGTERM)


trainer.train(load_config(None, json.loads(Path(sys.argv[1]).read_text())), trainer.TrainHooks(on_step_end))
'''


@pytest.mark.skipif(not TORCHRUN.exists() or not torch.distributed.is_available(), reason="needs torchrun")
def test_a_signal_to_one_process_stops_all_at_the_same_step(tmp_path):
    """SIGTERM to one DDP process: every process stops after the same step, the checkpoint is written by all
    (a collective) and each exits 143. Without agreement the signalled process would save while the others
    went on to the next step's collectives."""
    from rpo_fast import checkpoint

    model_dir = build_tiny_model_dir(tmp_path / "tiny")
    overrides = tiny_overrides(model_dir, tmp_path, finetune="full", reference="model", max_pairs_per_micro_batch=2,
                               eval_file="none", save_every=0, max_steps=4)
    (tmp_path / "overrides.json").write_text(json.dumps(overrides))
    (tmp_path / "driver.py").write_text(SIGNALLED_RANK)
    cmd = [str(TORCHRUN), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(tmp_path / "driver.py"), str(tmp_path / "overrides.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "stopped by SIGTERM after step 2 of 4: saved the checkpoint" in proc.stdout, \
        output[-3000:]
    # torchrun's report: the first process out exits 143; torchrun then sends SIGTERM to the other, which (its
    # checkpoint part done) exits 143 too or, caught by that second signal on its way out, -15
    codes = re.findall(r"exitcode  : (-?\d+)", output)
    assert "143" in codes and set(codes) <= {"143", "-15"}, output[-3000:]
    run = tmp_path / "run"
    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [2] and checkpoint.latest_checkpoint(run) is not None
    assert len(list((run / "checkpoints" / "step-000002").glob("rng-rank*.pt"))) == 2
