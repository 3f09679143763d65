"""The run folder (`output_dir`): one run per folder, and `--resume` only into the run that wrote it.

A fresh run into a folder that holds an earlier run's files is refused: its checkpoints would outrank the
new run's (pruning keeps the highest step numbers, so the new run's checkpoints would be the ones
deleted), a later `--resume` would continue the old run, and `metrics.jsonl` would mix the two. The user
says what they mean: `--resume` continues the earlier run, `--overwrite` deletes its files first (only
the files a run writes, never anything else in the folder), or another `output_dir` keeps both.

A run marks its folder with `RUN_MARKER` when it starts. Files that merely have a run file's name (a user's
own `model/` or `config.yaml`) in a folder without the marker are not deleted by `--overwrite`, nor taken
over by a fresh run: both are refused, naming them. A run folder from before the marker is recognised by its
`config.yaml`, which loads as the trainer's config.

A run folder is reused rather than a new one made per run (a timestamped subfolder) because the paths a
run prints and the README shows (`outputs/demo/model`) must stay where scripts and people look for them.

`--resume` continues only a run with the same config: the checkpoint's `config.yaml` must match the
current config except in `RESUME_FREE_KEYS`, keys that change how long the run goes on, where it logs,
how it reports, how a step's pairs are laid out or how the same numbers are computed (the head's backward,
checkpointing, where the reference log-probs come from), but not what a step computes. The data itself is
checked by the trainer once tokenized (`resume.check_same_data`): a `train_file` edited in place keeps its
path, so only the checkpoint's fingerprint of the tokenized pairs tells.
"""
from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

import yaml

from . import checkpoint
from .config import TrainConfig, load_config

# What a training run writes into output_dir (rpo_fast/trainer.py, resume.py, metrics.py, checkpoint.py).
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "final_metrics.txt", "metrics.png", "model", "tensorboard")
# Written into output_dir when a run starts (`claim`): the folder's RUN_FILES are a run's. Not among RUN_FILES:
# `--overwrite` keeps it (the folder stays a run folder), and alone it is no earlier run.
RUN_MARKER = ".rpo-fast-run"

# Keys that may differ between a checkpoint's config and the run resuming from it. Steps already taken are
# not redone: a longer max_steps / num_epochs continues on the new schedule's curve from the saved step.
RESUME_FREE_KEYS = frozenset({
    "resume", "overwrite", "output_dir",  # how this invocation was asked for
    "max_steps", "num_epochs",  # how long the run goes on
    "gradient_accumulation_steps",  # with another process count; the trainer checks processes x accumulation
    "progress", "plot", "tensorboard", "log_every", "save_every", "keep_checkpoints",  # reporting, saving
    "eval_file", "eval_every", "gold_eval_samples", "gold_max_new_tokens", "ref_cache_dir",  # evaluation, cache path
    # A layout: steps hold the same pairs either way, and the numbers differ only by rounding. A model that
    # cannot run shared-prompt rows turns it off, so its checkpoints record false where the user asked true.
    "share_prompt",
    # How the same step is computed: exact, or equal up to rounding (the head's backward and chunking, the
    # backbone's kernels and checkpointing). The out-of-memory advice names some of them: a run that ran out of
    # memory at step N can resume with them.
    "gradient_checkpointing", "impl", "head_backward", "head_chunk_tokens", "liger_kernels", "deterministic",
})
# Ways to get the same reference log-probs: a frozen copy of `ref_model` (default: the policy's `model`, the LoRA
# base), its precomputed log-probs, or the LoRA base with the adapter off. A change among them is free when
# ref_model stays the same (it is compared as any other key); `none` (no reference) changes the loss.
SAME_REFERENCE = frozenset({"model", "cache", "adapter"})


def earlier_run_files(output_dir: str | Path) -> list[str]:
    """Names of the files and folders of an earlier run in `output_dir` (empty folders do not count)."""
    root = Path(output_dir)
    found = []
    for name in RUN_FILES:
        path = root / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def claim(output_dir: str | Path) -> None:
    """Marks `output_dir` (which exists) as a run folder: writes RUN_MARKER unless present."""
    marker = Path(output_dir) / RUN_MARKER
    if not marker.is_file():
        marker.write_text("This folder holds an rpo-fast training run (rpo_fast/run_dir.py).\n", encoding="utf-8")


def is_run_folder(output_dir: str | Path) -> bool:
    """Whether `output_dir`'s RUN_FILES are a run's: it holds RUN_MARKER, or (a run from before the marker) a
    `config.yaml` that loads as the trainer's config (a non-empty mapping of its keys)."""
    root = Path(output_dir)
    if (root / RUN_MARKER).is_file():
        return True
    try:
        return bool(yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8"))) \
            and load_config(root / "config.yaml") is not None
    except (OSError, ValueError, yaml.YAMLError):
        return False


def _refuse_foreign(output_dir: str | Path, found: list[str]) -> None:
    """Raises the error for a folder whose run-file names (`found`) are not a run's (see `is_run_folder`)."""
    raise ValueError(f"output_dir: {output_dir} holds {', '.join(found)}, which rpo-fast did not write (no "
                     f"{RUN_MARKER} marker of a run, and no config.yaml of the trainer's); expected an empty folder "
                     "or a run folder: move them elsewhere or choose another output_dir (--overwrite deletes only "
                     "a run's files)")


def check_writable(output_dir: str | Path, key: str = "output_dir") -> None:
    """Creates `output_dir` if needed and writes a probe file into it.

    Raises:
        ValueError: naming `key` (the config key of the folder) when it is a file, sits under a file, or cannot
            be written.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{key}: expected a folder (or a path to create one), got the file {path}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".rpo-fast-write-test-{os.getpid()}"  # one per process: ranks check at once
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{key}: expected a folder this process can write, got {str(path)!r} "
                         f"({e.strerror or type(e).__name__})") from None


def _same_file(a, b) -> bool:
    """Two data paths that name files with the same bytes (a copied or moved dataset is the same dataset)."""
    return isinstance(a, str) and isinstance(b, str) and Path(a).is_file() and Path(b).is_file() \
        and filecmp.cmp(a, b, shallow=False)


def config_differences(saved: TrainConfig, current: TrainConfig) -> dict[str, tuple]:
    """{key: (saved value, current value)} for every key outside RESUME_FREE_KEYS whose value changed
    (train_file: a path to a file with the same bytes counts as unchanged; reference: a move within
    SAME_REFERENCE too)."""
    old, new = saved.to_dict(), current.to_dict()
    return {k: (old.get(k), v) for k, v in new.items() if k not in RESUME_FREE_KEYS and old.get(k) != v
            and not (k == "train_file" and _same_file(old.get(k), v))
            and not (k == "reference" and {old.get(k), v} <= SAME_REFERENCE)}


# The config keys that name what a run reads: --overwrite must not delete any of them.
INPUT_KEYS = ("model", "ref_model", "train_file", "eval_file", "ref_cache_dir")


def inputs_in_run_files(config: TrainConfig) -> list[tuple[str, str, str]]:
    """(key, path, run file) for each existing input path that lies in one of output_dir's RUN_FILES, which
    `clear` deletes (e.g. --model=OUT/checkpoints/step-000003/model with --overwrite into OUT)."""
    doomed = [(name, (Path(config.output_dir) / name).resolve()) for name in RUN_FILES]
    found = []
    for key in INPUT_KEYS:
        value = getattr(config, key)
        if not isinstance(value, str) or not value or not Path(value).exists():
            continue
        path = Path(value).resolve()
        found += [(key, value, name) for name, run_file in doomed if path == run_file or run_file in path.parents]
    return found


def check(config: TrainConfig) -> Path | None:
    """The run-folder policy, before anything loads. Returns the checkpoint `--resume` will continue (its
    files' sizes checked; the trainer checks their hashes), or None.

    Raises:
        ValueError: naming output_dir for an unwritable folder or an earlier run without --resume or
            --overwrite, or with files of a run's names that no run wrote (`is_run_folder`); naming the input
            (model, train_file, ...) that --overwrite would delete; naming
            resume for a checkpoint whose config differs outside RESUME_FREE_KEYS
            (listing each key with its saved and current value).
    """
    check_writable(config.output_dir)
    if config.overwrite:
        if doomed := inputs_in_run_files(config):
            key, value, name = doomed[0]
            raise ValueError(f"{key}: {value} lies in {Path(config.output_dir) / name}, which --overwrite deletes "
                             "before the run starts; expected an input outside the earlier run's files: copy it "
                             "elsewhere first, or write the new run to another output_dir")
        if (found := earlier_run_files(config.output_dir)) and not is_run_folder(config.output_dir):
            _refuse_foreign(config.output_dir, found)
        return None
    if config.resume:
        # Sizes only: the trainer verifies the hashes when it loads; hashing a 7B checkpoint twice costs minutes.
        latest = checkpoint.latest_checkpoint(config.output_dir, verify_hashes=False)
        if latest is not None:
            saved_config = latest / "config.yaml"
            try:
                saved = load_config(saved_config)
            except (OSError, ValueError) as e:
                raise ValueError(f"resume: cannot read the config of {latest} ({e}); start a new run with "
                                 "--overwrite or another output_dir") from None
            changed = config_differences(saved, config)
            if changed:
                listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
                raise ValueError(
                    f"resume: the checkpoint {latest} was written with another config ({listed}); "
                    f"expected the same config except {sorted(RESUME_FREE_KEYS)}. Resume with the checkpoint's "
                    "settings, or start a new run with --overwrite or another output_dir")
        return latest
    found = earlier_run_files(config.output_dir)
    if found and not is_run_folder(config.output_dir):
        _refuse_foreign(config.output_dir, found)
    if found:
        raise ValueError(f"output_dir: {config.output_dir} holds an earlier run ({', '.join(found)}); expected "
                         "--resume to continue it, --overwrite to delete it and start again, or another output_dir")
    return None


def clear(output_dir: str | Path) -> list[str]:
    """Deletes the earlier run's files in `output_dir` (RUN_FILES only; anything else stays). Returns their names.

    Raises:
        ValueError: naming them, when the folder is not a run folder (`is_run_folder`); nothing is deleted.
    """
    if (present := earlier_run_files(output_dir)) and not is_run_folder(output_dir):
        _refuse_foreign(output_dir, present)
    found = []
    for name in RUN_FILES:
        path = Path(output_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        found.append(name)
    return found
