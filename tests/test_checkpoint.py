"""Atomic checkpoints and exact resume.

Unit tests cover the write protocol (temp dir, manifest last, rename) and that torn, unmarked or
corrupted checkpoints are never picked as the latest. The end-to-end test interrupts a CPU training run
and resumes it: the final weights must equal an uninterrupted run's bit for bit.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rpo_fast import checkpoint
from rpo_fast.config import load_config
from rpo_fast.trainer import TrainHooks, train
from tiny_lm import build_tiny_model_dir, tiny_overrides


def write_checkpoint(out, step, payload=b"x" * 100):
    tmp = checkpoint.begin(out, step)
    (tmp / "model").mkdir()
    (tmp / "model" / "weights.bin").write_bytes(payload)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    return checkpoint.commit(tmp, step)


def test_commit_writes_marker_and_renames(tmp_path):
    final = write_checkpoint(tmp_path, 3)
    assert final.name == "step-000003" and checkpoint.is_complete(final)
    manifest = json.loads((final / checkpoint.MARKER).read_text())
    assert set(manifest["files"]) == {"model/weights.bin", "trainer_state.json"}
    assert not list(checkpoint.checkpoint_root(tmp_path).glob(".tmp-*"))
    assert checkpoint.latest_checkpoint(tmp_path) == final


def test_incomplete_checkpoints_are_never_latest(tmp_path):
    good = write_checkpoint(tmp_path, 2)
    # a crash before the rename: only a temp dir, even with a marker inside
    torn = checkpoint.begin(tmp_path, 4)
    (torn / "optimizer.pt").write_bytes(b"partial")
    (torn / checkpoint.MARKER).write_text("{}")
    # a step dir without a marker (e.g. copied by hand, or written by another tool)
    unmarked = checkpoint.checkpoint_root(tmp_path) / "step-000005"
    unmarked.mkdir()
    (unmarked / "trainer_state.json").write_text("{}")
    assert checkpoint.latest_checkpoint(tmp_path) == good
    # a newer complete one wins, until one of its files is damaged after the fact
    newer = write_checkpoint(tmp_path, 6)
    assert checkpoint.latest_checkpoint(tmp_path) == newer
    (newer / "model" / "weights.bin").write_bytes(b"y" * 100)  # same size, other bytes: the hash catches it
    assert checkpoint.latest_checkpoint(tmp_path) == good
    (good / "model" / "weights.bin").write_bytes(b"short")
    assert checkpoint.latest_checkpoint(tmp_path) is None


def test_recommit_same_step_replaces(tmp_path):
    write_checkpoint(tmp_path, 1, b"a" * 10)
    final = write_checkpoint(tmp_path, 1, b"b" * 20)
    assert (final / "model" / "weights.bin").read_bytes() == b"b" * 20 and checkpoint.is_complete(final)


def test_recommit_deletes_the_old_copy_only_once_the_new_one_is_in_place(tmp_path, monkeypatch):
    """Re-committing a step moved the old checkpoint aside and deleted it before renaming the new one in: a kill
    while deleting left no checkpoint of that step (with keep_checkpoints=1, none at all)."""
    import shutil

    write_checkpoint(tmp_path, 3, b"a" * 10)
    real_rmtree = shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        if Path(path).name.startswith(".old-"):
            raise SystemExit("killed while deleting the old copy")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(SystemExit):
        write_checkpoint(tmp_path, 3, b"b" * 20)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    latest = checkpoint.latest_checkpoint(tmp_path)
    assert latest is not None and (latest / "model" / "weights.bin").read_bytes() == b"b" * 20
    checkpoint.prune(tmp_path, keep=1)  # the next save's pruning removes the leftover
    assert [p.name for p in checkpoint.checkpoint_root(tmp_path).iterdir()] == ["step-000003"]


def test_rng_states_round_trip(tmp_path):
    """rng_state, saved and loaded as a checkpoint's rng file, then set_rng_state: Python's, numpy's and torch's
    generators draw again what they drew after the save."""
    import random

    import numpy as np

    def draws():
        return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draws()
    checkpoint.save_torch(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = draws()
    draws()
    checkpoint.set_rng_state(checkpoint.load_torch(tmp_path / "rng.pt"))
    got = draws()
    for name, a, b in zip(("python", "numpy", "torch"), got, expected):
        assert a == b, name


def test_prune_keeps_newest_complete(tmp_path):
    for step in (1, 2, 3, 4):
        write_checkpoint(tmp_path, step)
    checkpoint.begin(tmp_path, 5)  # stale temp dir
    checkpoint.prune(tmp_path, keep=2)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [3, 4]
    assert not list(checkpoint.checkpoint_root(tmp_path).glob(".tmp-*"))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def final_weights(run_dir):
    return load_file(run_dir / "model" / "model.safetensors")


@pytest.mark.parametrize("finetune, reference, optimizer", [
    ("full", "model", "adamw"), ("lora", "adapter", "adamw"),
    ("full", "model", "adamw_bf16_sr_in_backward"),  # per-parameter states and stochastic-rounding generators
])
def test_interrupted_and_resumed_equals_uninterrupted(tiny_model_dir, tmp_path, finetune, reference, optimizer):
    extra = dict(finetune=finetune, reference=reference, num_epochs=2, save_every=2, eval_file="none",
                 lora_r=4, lora_dropout=0.1,  # dropout: the RNG state must be restored too
                 optimizer=optimizer, **({"max_grad_norm": 0} if optimizer.endswith("in_backward") else {}))
    (tmp_path / "a").mkdir()
    whole = load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "a", **extra))
    train(whole)

    (tmp_path / "b").mkdir()
    parts = load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "b", **extra))

    def crash(step, record, policy):
        if step == 7:  # after the step-6 checkpoint: step 7 is lost and must be redone
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(parts, TrainHooks(on_step_end=crash))
    assert checkpoint.latest_checkpoint(parts.output_dir).name == "step-000006"
    parts.resume = True
    result = train(parts)
    assert result.state.step == 16 and result.state.epoch == 1

    expected, got = final_weights(tmp_path / "a" / "run"), final_weights(tmp_path / "b" / "run")
    assert expected.keys() == got.keys()
    changed = 0
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), f"{name}: max diff {(got[name] - tensor).abs().max()}"
        changed += not torch.equal(tensor, load_file(tiny_model_dir / "model.safetensors").get(name, tensor))
    assert changed > 0  # training moved the weights, so equality means something
    # the log reads like one run: each step once, in order
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 17))


def test_resume_refuses_a_checkpoint_without_optimizer_state(tiny_model_dir, tmp_path):
    """FSDP checkpoints written before sharded ones kept the gathered weights but no optimizer state: resuming
    from one is an error that says what to do, not a run that silently continues with a fresh optimizer."""
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, max_steps=2, save_every=1, eval_file="none"))
    train(config)
    latest = checkpoint.latest_checkpoint(config.output_dir)
    (latest / "optimizer.pt").unlink()
    (latest / checkpoint.MARKER).unlink()
    tmp = latest.parent / f".tmp-{latest.name}"
    latest.rename(tmp)
    latest = checkpoint.commit(tmp, 2)  # complete, as such checkpoints were
    config.resume = True
    with pytest.raises(ValueError, match="resume: .* has no optimizer state .*--model="):
        train(config)


def test_resume_without_checkpoint_starts_fresh(tiny_model_dir, tmp_path):
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, max_steps=2, resume=True, eval_file="none"))
    assert train(config).state.step == 2


def test_resume_with_longer_max_steps_runs_its_first_step_on_the_new_schedule(tiny_model_dir, tmp_path,
                                                                              monkeypatch):
    """A finished 8-step cosine run, resumed with max_steps=12: step 9 runs at the 12-step schedule's lr for
    step 9, as logged and as the optimizer applies it, not at the 8-step schedule's last value (0)."""
    from rpo_fast import trainer

    applied = []  # the param groups' lr each optimizer update runs with, in step order
    original_update = trainer.apply_update

    def recording_update(model, optimizer, *args, **kwargs):
        applied.append([group["lr"] for group in optimizer.param_groups])
        return original_update(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(trainer, "apply_update", recording_update)
    extra = dict(eval_file="none", lr_scheduler="cosine", warmup_steps=1)
    (tmp_path / "fresh").mkdir()
    fresh = train(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "fresh", max_steps=12, **extra)))
    fresh_lr = {r["step"]: r["lr"] for r in fresh.records if "loss" in r}
    fresh_applied, applied[:] = applied[:], []

    (tmp_path / "ext").mkdir()
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "ext", max_steps=8, **extra))
    train(config)
    assert fresh_lr[9] > 1e-3  # the new schedule has a real lr at step 9; the old one ended at 0
    saved = load_file(tmp_path / "ext" / "run" / "checkpoints" / "step-000008" / "model" / "model.safetensors")
    applied[:] = []
    changes = {}

    def weight_change(step, record, policy):
        if step == 9:
            changes[9] = max((t.detach() - saved[n]).abs().max().item() for n, t in policy.state_dict().items()
                             if n in saved)

    config.resume, config.max_steps = True, 12
    result = train(config, TrainHooks(on_step_end=weight_change))
    logged = {r["step"]: r["lr"] for r in result.records if "loss" in r}
    assert logged[9] == fresh_lr[9], (logged[9], fresh_lr[9])  # the first resumed step
    assert applied[0] == fresh_applied[8] and applied[0][0] == fresh_lr[9], (applied[0], fresh_applied[8])
    assert changes[9] > 0  # step 9 trained
    for step in (10, 11, 12):  # and the rest of the new schedule follows
        assert logged[step] == fresh_lr[step], step


def flip_a_byte(path):
    """Same size, other bytes: only the manifest's hash tells."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def test_resume_past_damaged_checkpoints(tiny_model_dir, tmp_path):
    """A damaged checkpoint (a flipped byte: its sizes still match the manifest) is skipped by --resume; the
    pruning, which checks sizes only, then kept it and deleted the resumed run's newer checkpoints (each
    lower-numbered). Now the checkpoint just written is never pruned. With no checkpoint left that verifies,
    --resume started fresh (emptying metrics.jsonl); now it is refused, naming the checkpoint and the file."""
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, max_steps=6, save_every=2, eval_file="none"))

    def crash(step, record, policy):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, TrainHooks(on_step_end=crash))
    run = tmp_path / "run"
    flip_a_byte(run / "checkpoints" / "step-000004" / "optimizer.pt")
    seen = {}

    def watch(step, record, policy):
        seen[step] = [s for s, _ in checkpoint.list_checkpoints(run)]

    config.resume, config.save_every, config.keep_checkpoints = True, 1, 1
    assert train(config, TrainHooks(on_step_end=watch)).state.step == 6
    assert seen[3] == [3, 4]  # resumed from step 2; step 3's checkpoint stays beside the damaged step 4
    assert seen[4] == [4] and checkpoint.latest_checkpoint(run).name == "step-000006"  # then step 4 replaced it

    flip_a_byte(run / "checkpoints" / "step-000006" / "optimizer.pt")  # the only checkpoint left
    log = (run / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"resume: no checkpoint in .*checkpoints verifies \(step-000006: "
                                         r"optimizer\.pt does not match its sha256 in the manifest\)"):
        train(config)
    assert (run / "metrics.jsonl").read_text() == log


def test_tensorboard_events_are_flushed_with_each_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """TensorBoard's writer buffers events; a crash after a checkpoint lost those the checkpoint covers (the
    resumed run purges past the checkpoint, so they never come back). The trainer now flushes it before each
    checkpoint's commit. The tensorboard package is not in the pinned set: a stand-in writer."""
    import importlib.util
    import sys
    import types

    events = []

    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            pass

        def add_scalar(self, key, value, step):
            events.append(("scalar", step))

        def flush(self):
            events.append(("flush", None))

        def close(self):
            events.append(("close", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tensorboard" else real_find_spec(name, *a))
    real_commit = checkpoint.commit
    monkeypatch.setattr(checkpoint, "commit",
                        lambda tmp, step: events.append(("commit", step)) or real_commit(tmp, step))
    train(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, max_steps=2, save_every=1, eval_file="none",
                                           tensorboard=True)))
    commits = [k for k, (kind, _) in enumerate(events) if kind == "commit"]
    assert len(commits) == 2  # step 1 (save_every) and the final one
    for k in commits:
        assert events[k - 1] == ("flush", None), events
