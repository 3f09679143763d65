"""One run per output folder: an earlier run's checkpoints never outrank a new run's, and --resume continues
only the run that wrote the folder, with the same config. Run through the CLI's main, in process."""
import pytest
import yaml

from tiny_lm import build_tiny_model_dir, load_json_lines, tiny_overrides

from rpo_fast import checkpoint, cli, run_dir
from rpo_fast.config import load_config


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def train(config_file, *args, capsys):
    code = cli.main(["train", "--config", str(config_file), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def loss_steps(run):
    return [r["step"] for r in load_json_lines(run / "metrics.jsonl") if "loss" in r]


def first_run(tiny_model_dir, tmp_path, capsys, **overrides):
    """Writes tmp_path/tiny.yaml (the tiny run with `overrides`, into tmp_path/run) and trains it once, which must
    succeed: (the config file, its values, what the run printed)."""
    values = tiny_overrides(tiny_model_dir, tmp_path, **overrides)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(values))
    code, out, err = train(config_file, capsys=capsys)
    assert code == 0, err[-2000:]
    return config_file, values, out + err


def test_stale_checkpoints_never_win(tiny_model_dir, tmp_path, capsys):
    """The sequence of the README's old walkthrough: a 3-step run, then a fresh 2-step run in the same folder
    (keeping one checkpoint), then --resume to step 3. Before, the old run's step-3 checkpoint survived the
    pruning and the "resumed" run continued it; now the fresh run is refused until asked to overwrite."""
    config_file, _, _ = first_run(tiny_model_dir, tmp_path, capsys, eval_file=None, save_every=1, beta=0.2,
                                  max_steps=3)
    run = tmp_path / "run"
    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [2, 3] and loss_steps(run) == [1, 2, 3]
    assert (run / run_dir.RUN_MARKER).is_file()  # the run marked its folder

    # A fresh run into the same folder: refused before any model loads, the earlier run untouched.
    code, _, err = train(config_file, "--max_steps=2", "--keep_checkpoints=1", capsys=capsys)
    assert code == 2 and "error: output_dir:" in err and "--resume" in err and "--overwrite" in err, err
    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [2, 3] and loss_steps(run) == [1, 2, 3]

    # --overwrite: the earlier run's files go, the new run's checkpoint is the one kept.
    (run / "notes.txt").write_text("mine")  # not a run file: stays
    code, out, err = train(config_file, "--max_steps=2", "--keep_checkpoints=1", "--beta=0.3", "--overwrite",
                           capsys=capsys)
    assert code == 0, err[-2000:]
    assert "overwrite: deleted the earlier run's checkpoints, metrics.jsonl" in out
    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [2] and loss_steps(run) == [1, 2]
    assert (run / "notes.txt").read_text() == "mine"
    saved = load_config(checkpoint.latest_checkpoint(run) / "config.yaml")
    assert (saved.beta, saved.max_steps) == (0.3, 2)

    # --resume with another loss setting: refused, naming the key and both values.
    code, _, err = train(config_file, "--max_steps=3", "--resume", capsys=capsys)  # beta 0.2 in the file
    assert code == 2 and "error: resume:" in err and "beta: 0.3 -> 0.2" in err, err
    # --resume with the same config, longer (max_steps may change): continues the new run.
    code, out, err = train(config_file, "--max_steps=3", "--beta=0.3", "--resume", "--keep_checkpoints=1",
                           capsys=capsys)
    assert code == 0, err[-2000:]
    assert f"resumed from {run / 'checkpoints' / 'step-000002'} at step 2" in out
    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [3] and loss_steps(run) == [1, 2, 3]


def test_resume_when_the_model_turned_share_prompt_off(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A model that cannot run shared-prompt rows turns `share_prompt` off, and the checkpoints record the
    config that ran (share_prompt false). Resuming with the same config file (share_prompt true) must
    continue the run: before, the resume check called that a changed key and refused it."""
    from rpo_fast import modeling

    monkeypatch.setattr(modeling, "shared_prompt_unsupported", lambda model: "the test says it mixes tokens")
    config_file, _, printed = first_run(tiny_model_dir, tmp_path, capsys, eval_file=None, save_every=1, max_steps=2,
                                        share_prompt=True)
    run = tmp_path / "run"
    assert "notice: share_prompt is off" in printed
    assert load_config(run / "checkpoints" / "step-000002" / "config.yaml").share_prompt is False
    code, out, err = train(config_file, "--max_steps=3", "--resume", capsys=capsys)
    assert code == 0, err[-2000:]
    assert f"resumed from {run / 'checkpoints' / 'step-000002'} at step 2" in out
    assert loss_steps(run) == [1, 2, 3]


def test_logged_lr_is_the_lr_the_step_ran_at(tiny_model_dir, tmp_path, capsys):
    # warmup_steps=1 (tiny_overrides): step 1 runs at lr 0, step 2 at the full rate (cosine starts at 1)
    _, values, _ = first_run(tiny_model_dir, tmp_path, capsys, eval_file=None, max_steps=3, lr_scheduler="constant")
    lrs = [r["lr"] for r in load_json_lines(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert lrs == [0.0, values["learning_rate"], values["learning_rate"]]


def test_resume_free_keys_are_config_keys():
    from rpo_fast.config import TrainConfig

    assert run_dir.RESUME_FREE_KEYS <= set(TrainConfig.__dataclass_fields__)
    assert not {"beta", "alpha", "learning_rate", "model", "train_file", "seed"} & run_dir.RESUME_FREE_KEYS
    # keys that change the batch plan (which pairs each step holds) or the objective
    assert not {"token_budget", "max_pairs_per_micro_batch", "shuffle", "max_length", "max_prompt_length",
                "sft_norm"} & run_dir.RESUME_FREE_KEYS


def test_resume_check_compares_the_train_file_by_content(tmp_path):
    from rpo_fast.config import TrainConfig

    a, b, c = (tmp_path / name for name in ("a.jsonl", "b.jsonl", "c.jsonl"))
    a.write_text("same\n")
    b.write_text("same\n")
    c.write_text("other\n")
    saved = TrainConfig(train_file=str(a))
    assert run_dir.config_differences(saved, TrainConfig(train_file=str(b), max_steps=9)) == {}  # moved/copied
    assert run_dir.config_differences(saved, TrainConfig(train_file=str(c))) == {"train_file": (str(a), str(c))}
    assert run_dir.config_differences(saved, TrainConfig(train_file=str(a), beta=0.3)) == {"beta": (0.1, 0.3)}


@pytest.mark.parametrize("key", ["model", "train_file"])
def test_overwrite_refuses_to_delete_an_input_of_the_new_run(key, tiny_model_dir, tmp_path, capsys):
    """--overwrite deletes the earlier run's files before the new run loads anything: an input inside them (e.g.
    --model=OUT/checkpoints/step-000003/model, a checkpoint's weights) is refused first, and nothing is deleted."""
    import shutil

    values = tiny_overrides(tiny_model_dir, tmp_path, eval_file=None, max_steps=1)
    run = tmp_path / "run"
    kept = run / "checkpoints" / "step-000003"
    shutil.copytree(tiny_model_dir, kept / "model")
    shutil.copy(values["train_file"], kept / "train.jsonl")
    (run / "metrics.jsonl").write_text("{}\n")
    inside = {"model": kept / "model", "train_file": kept / "train.jsonl"}[key]
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(values))
    code, _, err = train(config_file, f"--{key}={inside}", "--overwrite", capsys=capsys)
    assert code == 2 and f"error: {key}: {inside} lies in {run / 'checkpoints'}" in err, err
    assert inside.exists() and (run / "metrics.jsonl").exists()


def test_resuming_a_run_that_already_reached_its_steps_trains_and_logs_nothing_new(tiny_model_dir, tmp_path, capsys):
    """--resume of a finished run (or with max_steps below the checkpoint's step) trains nothing, and adds no
    second eval record of the same model (before: a duplicate at the same step, or one labelled max_steps);
    the final table still shows the eval logged at the checkpoint's step."""
    config_file, _, _ = first_run(tiny_model_dir, tmp_path, capsys, max_steps=2)
    run = tmp_path / "run"

    def evals():
        return [r["step"] for r in load_json_lines(run / "metrics.jsonl") if "eval/loss" in r]

    assert evals() == [0, 2]
    for max_steps in (2, 1):
        code, out, err = train(config_file, "--resume", f"--max_steps={max_steps}", capsys=capsys)
        assert code == 0, err[-2000:]
        assert f"the checkpoint is at step 2, and this run has {max_steps} steps: nothing to train" in out
        assert evals() == [0, 2] and loss_steps(run) == [1, 2]
        assert "eval" in (run / "final_metrics.txt").read_text()


def test_resume_refuses_a_train_file_edited_in_place(tiny_model_dir, tmp_path, capsys):
    """The resume check compares the train_file path, and a moved file's bytes: other rows at the same path passed
    it, and the run continued its data position in another batch plan. The checkpoint now holds the tokenized
    pairs' fingerprint; a checkpoint without one (written before) still resumes, unchecked."""
    import json

    from tiny_lm import write_rows

    config_file, _, _ = first_run(tiny_model_dir, tmp_path, capsys, eval_file=None, save_every=1, max_steps=2)
    run = tmp_path / "run"
    original = (tmp_path / "train.jsonl").read_bytes()
    write_rows(tmp_path / "train.jsonl", 16, offset=100)  # same path, other rows
    code, _, err = train(config_file, "--max_steps=3", "--resume", capsys=capsys)
    assert code == 2 and "error: resume: train_file" in err and "holds other data than the checkpoint" in err, err
    assert loss_steps(run) == [1, 2]  # nothing ran, the log is untouched

    # a checkpoint from before the fingerprint: resumed, unchecked (as before)
    latest = checkpoint.latest_checkpoint(run)
    state = json.loads((latest / "trainer_state.json").read_text())
    del state["data_fingerprint"]
    (latest / "trainer_state.json").write_text(json.dumps(state))
    (latest / checkpoint.MARKER).unlink()
    latest.rename(latest.parent / f".tmp-{latest.name}")
    checkpoint.commit(latest.parent / f".tmp-{latest.name}", 2)
    (tmp_path / "train.jsonl").write_bytes(original)
    code, out, err = train(config_file, "--max_steps=3", "--resume", capsys=capsys)
    assert code == 0, err[-2000:]
    assert loss_steps(run) == [1, 2, 3]


def test_overwrite_deletes_only_a_runs_files(tmp_path):
    """--overwrite deleted anything named like a run file (a user's own model/, config.yaml) in output_dir. Now
    only a folder a run marked, or a run folder from before the marker (its config.yaml is the trainer's), is
    cleared; otherwise a fresh run and --overwrite are both refused, naming the files, and nothing is deleted."""
    from rpo_fast.config import TrainConfig, save_config

    project = tmp_path / "myproject"
    (project / "model").mkdir(parents=True)
    (project / "model" / "my_notes.py").write_text("# the user's own code\n")
    (project / "config.yaml").write_text("# the user's own CI config\n")
    (project / "train.jsonl").write_text("{}\n")
    config = TrainConfig(output_dir=str(project), train_file=str(project / "train.jsonl"))
    for overwrite in (False, True):
        config.overwrite = overwrite
        with pytest.raises(ValueError, match=r"output_dir: .*myproject holds config.yaml, model, which rpo-fast did "
                                             r"not write \(no \.rpo-fast-run marker"):
            run_dir.check(config)
    with pytest.raises(ValueError, match="which rpo-fast did not write"):
        run_dir.clear(project)
    assert (project / "model" / "my_notes.py").is_file() and (project / "config.yaml").is_file()

    # a run folder from before the marker: its config.yaml loads as the trainer's, so --overwrite clears it
    old_run = tmp_path / "old_run"
    (old_run / "checkpoints" / "step-000002").mkdir(parents=True)
    (old_run / "checkpoints" / "step-000002" / "trainer_state.json").write_text("{}")
    save_config(TrainConfig(), old_run / "config.yaml")
    (old_run / "notes.txt").write_text("mine")
    config = TrainConfig(output_dir=str(old_run), train_file=str(project / "train.jsonl"), overwrite=True)
    assert run_dir.check(config) is None
    assert run_dir.clear(old_run) == ["checkpoints", "config.yaml"]
    assert sorted(p.name for p in old_run.iterdir()) == ["notes.txt"]
    # a marked folder (a run wrote the marker at its start) is a run's, whatever its config.yaml holds
    (project / run_dir.RUN_MARKER).write_text("")
    config = TrainConfig(output_dir=str(project), train_file=str(project / "train.jsonl"))
    with pytest.raises(ValueError, match="holds an earlier run"):
        run_dir.check(config)


def test_a_kill_between_the_final_checkpoint_and_the_final_eval_is_resumed(tiny_model_dir, tmp_path, monkeypatch):
    """The final checkpoint is written before the final eval: a kill in between left a checkpoint at the last
    step, so --resume trained nothing and never ran the final eval ('eval after' stayed '-' for good), and it
    wrote the same checkpoint again. Now the missing final eval runs, and the checkpoint is not rewritten."""
    from rpo_fast import trainer

    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, max_steps=2, save_every=1))
    evaluate, calls = trainer.evaluate, []

    def dying_eval(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # 1: eval before training; 2: the final eval, after the final checkpoint
            raise KeyboardInterrupt("killed during the final eval")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", dying_eval)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(config)
    monkeypatch.setattr(trainer, "evaluate", evaluate)
    run = tmp_path / "run"
    assert checkpoint.latest_checkpoint(run).name == "step-000002"
    commits = []
    monkeypatch.setattr(checkpoint, "commit", lambda *args: commits.append(args))
    config.resume = True
    result = trainer.train(config)
    assert [r["step"] for r in load_json_lines(run / "metrics.jsonl") if "eval/loss" in r] == [0, 2]
    after = next(r for r in result.records if r["step"] == 2 and "eval/loss" in r)
    loss_row = next(line for line in result.table.splitlines() if line.startswith("loss "))
    assert loss_row.split()[-1] == f"{after['eval/loss']:.4g}", result.table
    assert commits == []  # the step-2 checkpoint is the final one already


def test_eval_before_is_blank_when_resume_changed_the_eval_file(tiny_model_dir, tmp_path, capsys):
    """eval_file may change on --resume; the final table then showed 'eval before' from the old set beside
    'eval after' from the new one. The eval history records each eval set's fingerprint, and the table leaves
    'eval before' blank (with a note) when the set changed."""
    from rpo_fast import trainer
    from tiny_lm import write_rows

    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, max_steps=2, save_every=1))

    def crash(step, record, policy):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.train(config, trainer.TrainHooks(on_step_end=crash))
    config.resume, config.eval_file = True, str(write_rows(tmp_path / "other_eval.jsonl", 8, "eval", offset=8))
    capsys.readouterr()
    result = trainer.train(config)
    out = capsys.readouterr().out
    assert "note: eval_file" in out and "leaves 'eval before' blank" in out, out
    loss_row = next(line for line in result.table.splitlines() if line.startswith("loss "))
    after = next(r for r in result.records if r["step"] == 2 and "eval/loss" in r)
    assert loss_row.split()[-2:] == ["-", f"{after['eval/loss']:.4g}"], result.table


@pytest.mark.parametrize("change", [dict(gradient_checkpointing=True), dict(head_backward="recompute"),
                                    dict(head_chunk_tokens=16), dict(impl="dense"), dict(deterministic=True),
                                    dict(liger_kernels=False), dict(reference="cache"), dict(reference="model")])
def test_resume_accepts_what_changes_only_how_a_step_is_computed(change):
    """The out-of-memory advice (--gradient_checkpointing=true, --reference=cache) must not make the run's
    checkpoints unusable: these keys change memory or speed, not the step's numbers beyond rounding."""
    from rpo_fast.config import TrainConfig

    saved = TrainConfig(finetune="lora", reference="adapter")
    assert run_dir.config_differences(saved, TrainConfig(**{"finetune": "lora", "reference": "adapter", **change})) \
        == {}


def test_resume_refuses_another_reference():
    from rpo_fast.config import TrainConfig

    saved = TrainConfig(finetune="full", reference="model")
    assert run_dir.config_differences(saved, TrainConfig(finetune="full", reference="none")) == \
        {"reference": ("model", "none")}
    assert run_dir.config_differences(saved, TrainConfig(finetune="full", reference="cache", ref_model="other")) == \
        {"ref_model": (None, "other")}


def test_a_run_resumes_with_the_out_of_memory_advice(tiny_model_dir, tmp_path, capsys):
    """After an out-of-memory exit the advice is --gradient_checkpointing=true and --reference=cache: the run's
    checkpoints must stay usable with them (before, --resume refused both as changed keys)."""
    config_file, _, _ = first_run(tiny_model_dir, tmp_path, capsys, eval_file=None, save_every=1, max_steps=2)
    run = tmp_path / "run"
    code, out, err = train(config_file, "--max_steps=3", "--resume", "--gradient_checkpointing=true",
                           "--reference=cache", f"--ref_cache_dir={tmp_path / 'cache'}", capsys=capsys)
    assert code == 0, err[-2000:]
    assert f"resumed from {run / 'checkpoints' / 'step-000002'} at step 2" in out
    assert loss_steps(run) == [1, 2, 3]
