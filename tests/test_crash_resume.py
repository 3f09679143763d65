"""Crash safety end to end (issue 8): a CPU training process is SIGKILLed at seeded-random points, including
in the middle of writing a checkpoint, and resumed each time; the run must end with exactly the weights of
an uninterrupted run, and after every kill the checkpoint `latest_checkpoint` picks must be the newest one
whose commit finished, identical to the uninterrupted run's checkpoint of that step (never a torn one).

Training runs in a subprocess (a small driver script calling `trainer.train`) so the kill is a real
SIGKILL: no exception handler, no `finally`, no flush. The driver reads where to die from $CRASH_AT,
JSON [kind, K, FILE, fraction]:

    step:K           at the end of step K (after its checkpoint is committed)
    torn:K:FILE      while writing checkpoint K: FILE (optimizer.pt, rng-rank0.pt, trainer_state.json or the
                     model dir) is cut to a random fraction of its bytes, then the process dies
    marker:K         checkpoint K's COMPLETE manifest is written and fsynced, but the directory not yet renamed
    prune:K          checkpoint K is committed (renamed), but the old ones are not yet pruned

The kill points are drawn from a seeded RNG (CRASH_RESUME_SEED, default 0, to explore others).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rpo_fast import checkpoint
from rpo_fast.config import load_config
from rpo_fast.trainer import train
from tiny_lm import build_tiny_model_dir, subprocess_env, tiny_overrides

STEPS = 6
SEED = int(os.environ.get("CRASH_RESUME_SEED", "0"))

DRIVER = r'''
import json, os, signal, sys
from pathlib import Path

from rpo_fast import checkpoint, modeling, trainer
from rpo_fast.config import load_config

overrides, commits_log = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
kind, step, target, fraction = json.loads(os.environ.get("CRASH_AT", '["none", 0, "", 0]'))
current = [None]  # the step of the checkpoint being written


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def tear(path):
    """Cuts `path` (or the largest file under it) to `fraction` of its bytes, then dies."""
    path = Path(path)
    if path.is_dir():
        path = max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * fraction))
    die()


def wrap(module, name, before=None, after=None):
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after:
            after(result, *args, **kwargs)
        return result

    setattr(module, name, wrapped)


def begun(result, output_dir, s):
    current[0] = s


def committed(result, tmp, s):
    with open(commits_log, "a") as f:
        f.write(f"{s}\n")
        f.flush()
        os.fsync(f.fileno())


wrap(checkpoint, "begin", after=begun)
wrap(checkpoint, "commit", after=committed)
if kind == "torn":
    def maybe_tear(result, *args, **kwargs):
        path = Path(args[2] if target == "model" else args[1])
        # only inside checkpoint `step`, not the final model under output_dir
        if current[0] == step and path.name == target and path.parent != Path(overrides["output_dir"]):
            tear(path)

    if target == "model":
        wrap(modeling, "save_pretrained", after=maybe_tear)
    else:
        wrap(checkpoint, "save_torch", after=maybe_tear)
        wrap(checkpoint, "write_json", after=maybe_tear)
elif kind == "marker":
    def maybe_die(result, path):
        path = Path(path)
        if path == checkpoint.temp_dir(overrides["output_dir"], step) and (path / checkpoint.MARKER).exists():
            die()

    wrap(checkpoint, "_fsync_dir", after=maybe_die)
elif kind == "prune":
    wrap(checkpoint, "prune", before=lambda *a, **k: current[0] == step and die())

on_step_end = (lambda s, record, policy: s == step and die()) if kind == "step" else None
trainer.train(load_config(None, overrides), trainer.TrainHooks(on_step_end=on_step_end))
'''

TORN_FILES = ("optimizer.pt", "model", "rng-rank0.pt", "trainer_state.json")


def kill_schedule(seed: int) -> list[tuple]:
    """Five kill points (kind, step, file, fraction) in run order, each one reachable after resuming from
    the checkpoint the previous one leaves: a seeded shuffle of the kinds, steps drawn at random."""
    rng = random.Random(seed)
    kinds = ["step", "marker", "prune"] + [f"torn:{name}" for name in TORN_FILES]
    rng.shuffle(kinds)
    kinds = kinds[:5]
    if not any(k.startswith("torn") for k in kinds):
        kinds[rng.randrange(5)] = f"torn:{rng.choice(TORN_FILES)}"
    schedule, latest = [], 0
    for kind in kinds:
        kind, _, target = kind.partition(":")
        # the next step the resumed run reaches is latest + 1; a kill that commits nothing may wait one more
        step = latest + 1 if kind in ("step", "prune") else min(STEPS, latest + rng.randint(1, 2))
        schedule.append((kind, step, target, round(rng.uniform(0.05, 0.95), 3)))
        latest = expected_latest(kind, step, latest)
    return schedule


def expected_latest(kind: str, step: int, latest: int) -> int:
    """The newest committed checkpoint after a kill at (kind, step) in a run resumed from `latest`."""
    if kind == "prune":
        return step
    if kind == "step":  # the last step's checkpoint is written after its on_step_end
        return step if step < STEPS else step - 1
    return max(latest, step - 1)  # torn / marker: checkpoint `step` never completes


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def run_overrides(tiny_model_dir, tmp_path, **extra):
    # LoRA with dropout: the RNG states must be restored too; a checkpoint after every step.
    return tiny_overrides(tiny_model_dir, tmp_path, **{**dict(finetune="lora", reference="adapter", lora_r=4,
                          lora_dropout=0.1, max_steps=STEPS, save_every=1, eval_file="none"), **extra})


def model_state(directory):
    return {name: tensor for f in sorted(directory.glob("*.safetensors")) for name, tensor in load_file(f).items()}


def assert_same_tensors(got: dict, expected: dict, what: str):
    assert got.keys() == expected.keys(), what
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), f"{what}: {name} differs"


def assert_same_checkpoint(got, expected):
    """Two checkpoints hold the same training state: weights, optimizer, scheduler, RNG, counters."""
    assert_same_tensors(model_state(got / "model"), model_state(expected / "model"), f"{got} model")
    for name in ("optimizer.pt", "scheduler.pt", "rng-rank0.pt"):
        a, b = checkpoint.load_torch(got / name), checkpoint.load_torch(expected / name)
        assert str(_flat(a)) == str(_flat(b)), f"{got}/{name} differs"
    assert checkpoint.read_json(got / "trainer_state.json") == checkpoint.read_json(expected / "trainer_state.json")


def _flat(obj):
    """A comparable form of a nested state dict (tensors as lists, numpy arrays as lists)."""
    if isinstance(obj, dict):
        return {k: _flat(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_flat(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


def test_kill_schedules_are_reachable():
    for seed in range(200):
        schedule, latest = kill_schedule(seed), 0
        assert len(schedule) == 5 and any(kind == "torn" for kind, *_ in schedule), schedule
        for kind, step, _, _ in schedule:
            assert latest < step <= STEPS, (seed, schedule)
            latest = expected_latest(kind, step, latest)


def test_sigkill_anywhere_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    # The uninterrupted run, keeping every checkpoint to compare with.
    (tmp_path / "whole").mkdir()
    train(load_config(None, run_overrides(tiny_model_dir, tmp_path / "whole", keep_checkpoints=STEPS)))
    whole = tmp_path / "whole" / "run"
    reference = {s: d for s, d in checkpoint.list_checkpoints(whole)}
    assert sorted(reference) == list(range(1, STEPS + 1))

    (tmp_path / "crashy").mkdir()
    overrides = run_overrides(tiny_model_dir, tmp_path / "crashy", resume=True)
    out = tmp_path / "crashy" / "run"
    (tmp_path / "overrides.json").write_text(json.dumps(overrides))
    (tmp_path / "driver.py").write_text(DRIVER)
    commits = tmp_path / "commits.log"

    def launch(crash_at):
        return subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "overrides.json"),
                               str(commits)], env=subprocess_env(CRASH_AT=json.dumps(crash_at)), cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    schedule, predicted = kill_schedule(SEED), 0
    torn_seen = 0
    for crash_at in schedule:
        predicted = expected_latest(crash_at[0], crash_at[1], predicted)
        proc = launch(crash_at)
        assert proc.returncode == -signal.SIGKILL, f"{crash_at}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        committed = [int(line) for line in commits.read_text().split()] if commits.exists() else []
        latest = checkpoint.latest_checkpoint(out)
        assert (committed[-1] if committed else 0) == predicted, (crash_at, committed)
        if not committed:
            assert latest is None, f"after {crash_at}: {latest} picked, but no commit ever finished"
            continue
        # The newest checkpoint whose commit finished, nothing newer (torn, unrenamed), and intact.
        assert latest is not None and latest.name == checkpoint.step_dir_name(committed[-1]), (crash_at, latest)
        assert_same_checkpoint(latest, reference[committed[-1]])
        if crash_at[0] in ("torn", "marker"):  # the half-written checkpoint is still on disk, and ignored
            torn = checkpoint.temp_dir(out, crash_at[1])
            assert torn.is_dir(), f"{crash_at}: expected the torn temp dir {torn}"
            torn_seen += 1
    assert torn_seen >= 1

    proc = launch(["none", 0, "", 0])  # the last resume runs to the end
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = model_state(whole / "model"), model_state(out / "model")
    assert_same_tensors(got, expected, "final model")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(t, initial[k]) for k, t in expected.items() if k in initial)  # training moved them
    assert_same_checkpoint(checkpoint.latest_checkpoint(out), reference[STEPS])
    assert not list(checkpoint.checkpoint_root(out).glob(".tmp-*"))  # leftovers of the kills are cleaned up


SEEDED_RUN = r'''
import importlib.abc, json, random, sys
from pathlib import Path

import numpy as np


class DrawOnImport(importlib.abc.MetaPathFinder):
    """A library that draws from the global RNGs when first imported, as huggingface_hub 1.33 does under peft."""

    def find_spec(self, name, path=None, target=None):
        if name == "peft":
            random.random(), np.random.rand()
        return None  # the normal import goes on


sys.meta_path.insert(0, DrawOnImport())
from rpo_fast.config import load_config
from rpo_fast.trainer import train

assert "peft" not in sys.modules
train(load_config(None, json.loads(Path(sys.argv[1]).read_text())))
'''


def test_checkpointed_rng_states_do_not_depend_on_earlier_imports(tiny_model_dir, tmp_path):
    # The trainer draws nothing from Python's or numpy's global RNG, so after step 1 a fresh process must hold
    # exactly the seeded states, even when peft (imported only for LoRA) draws at import.
    overrides = {**run_overrides(tiny_model_dir, tmp_path), "max_steps": 1}
    (tmp_path / "overrides.json").write_text(json.dumps(overrides))
    (tmp_path / "run.py").write_text(SEEDED_RUN)
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "overrides.json")],
                          env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = checkpoint.load_torch(checkpoint.latest_checkpoint(tmp_path / "run") / "rng-rank0.pt")
    seed = load_config(None, overrides).seed
    random.seed(seed)
    assert str(_flat(saved["python"])) == str(_flat(random.getstate()))
    np.random.seed(seed)
    assert str(_flat(saved["numpy"])) == str(_flat(np.random.get_state()))


STOPPED_RUN = r'''
import json, sys, time
from pathlib import Path

from rpo_fast.config import load_config
from rpo_fast.trainer import TrainHooks, train

overrides, ready, sent = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), Path(sys.argv[3])


def wait_for_the_signal(step, record, policy):
    if step == 3:  # the parent signals this process now; its handler runs while the hook waits
        ready.write_text("")
        deadline = time.time() + 60
        while not sent.exists() and time.time() < deadline:
            time.sleep(0.05)


train(load_config(None, overrides), TrainHooks(on_step_end=wait_for_the_signal))
'''


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_and_resume_equals_uninterrupted(tiny_model_dir, tmp_path, sig, code):
    """SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C) saved nothing: the run died and lost every step since
    its last checkpoint (with save_every=0, all of them). Now the step loop stops at the next step boundary,
    saves a checkpoint whatever save_every says, and exits 143 / 130; --resume then ends where an
    uninterrupted run does."""
    (tmp_path / "whole").mkdir()
    train(load_config(None, run_overrides(tiny_model_dir, tmp_path / "whole", save_every=0)))

    (tmp_path / "stopped").mkdir()
    overrides = run_overrides(tiny_model_dir, tmp_path / "stopped", save_every=0)
    (tmp_path / "overrides.json").write_text(json.dumps(overrides))
    (tmp_path / "run.py").write_text(STOPPED_RUN)
    ready, sent = tmp_path / "ready", tmp_path / "sent"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "overrides.json"), str(ready),
                             str(sent)], env=subprocess_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists(), proc.communicate(timeout=60)
        proc.send_signal(sig)
        sent.write_text("")
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-3000:]
    out_dir = tmp_path / "stopped" / "run"
    assert f"stopped by {sig.name} after step 3 of {STEPS}: saved the checkpoint {out_dir / 'checkpoints'}" in out
    assert "--resume" in out
    assert [s for s, _ in checkpoint.list_checkpoints(out_dir)] == [3]
    assert checkpoint.latest_checkpoint(out_dir).name == "step-000003"

    train(load_config(None, {**overrides, "resume": True}))
    assert_same_tensors(model_state(out_dir / "model"), model_state(tmp_path / "whole" / "run" / "model"),
                        "final model")
    steps = [r["step"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))


def test_stop_request_restores_the_handlers_and_stays_out_of_other_threads():
    import threading

    from rpo_fast.trainer import StopRequest

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopRequest().installed() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        signal.raise_signal(signal.SIGTERM)  # recorded, not fatal
        assert stop.signum == signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

    seen = []

    def in_a_thread():  # signal.signal raises ValueError outside the main thread
        with StopRequest().installed() as stop:
            seen.append((stop.previous, signal.getsignal(signal.SIGTERM)))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [({}, before[0])]
