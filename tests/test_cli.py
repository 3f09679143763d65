"""The command line, run as a user would (`python -m rpo_fast.cli`), on the tiny model."""
import os
import subprocess
import sys

import pytest
import yaml

from tiny_lm import REPO, build_tiny_model_dir, load_json_lines, tiny_overrides

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "rpo_fast.cli", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def write_config(path, values):
    path.write_text(yaml.safe_dump(values))
    return path


def test_print_config_applies_file_then_overrides(tmp_path):
    config = write_config(tmp_path / "c.yaml", {"beta": 0.3, "preset": "rpo-paper"})
    proc = cli("train", "--config", config, "--print-config", "--learning_rate=1e-5")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["beta"] == 0.3 and printed["learning_rate"] == 1e-5
    assert printed["alpha"] == pytest.approx(0.005 * 0.3)  # the paper's eta * beta, with the file's beta


@pytest.mark.parametrize("args, message", [
    (["--lerning_rate=1"], "lerning_rate: unknown config key; did you mean ['learning_rate']"),
    (["--beta=-1"], "beta: expected a finite number > 0, got -1.0"),
    (["--config", "missing.yaml"], "missing.yaml"),
])
def test_bad_arguments_exit_2_with_the_reason(args, message):
    proc = cli("train", *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_train_then_precompute_and_train_from_cache(tiny_model_dir, tmp_path):
    values = tiny_overrides(tiny_model_dir, tmp_path, max_steps=2, plot=True)
    config = write_config(tmp_path / "tiny.yaml", values)
    proc = cli("train", "--config", config, "--learning_rate=2e-3")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("metrics.jsonl", "metrics.png", "final_metrics.txt", "config.yaml", "model/model.safetensors"):
        assert (run / name).is_file(), name
    assert "rewards/accuracies" in proc.stdout and "eval after" in proc.stdout  # the final table
    assert yaml.safe_load((run / "config.yaml").read_text())["learning_rate"] == 2e-3
    assert [r["step"] for r in load_json_lines(run / "metrics.jsonl") if "loss" in r] == [1, 2]

    proc = cli("precompute-ref", "--config", config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    caches = sorted((tmp_path / "ref_cache").glob("ref-logps-*.pt"))
    assert len(caches) == 2 and f"train: {tmp_path / 'ref_cache'}" in proc.stdout
    mtimes = [p.stat().st_mtime_ns for p in caches]
    proc = cli("train", "--config", config, "--reference=cache", f"--output_dir={tmp_path / 'cached'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in caches] == mtimes  # read, not recomputed
    assert len(list((tmp_path / "ref_cache").glob("ref-logps-*.pt"))) == 2
    # same reference, same data: the cached run logs what the frozen-model run logged
    first = [r for r in load_json_lines(run / "metrics.jsonl") if "eval/loss" in r][0]
    first_cached = [r for r in load_json_lines(tmp_path / "cached" / "metrics.jsonl") if "eval/loss" in r][0]
    assert first["eval/loss"] == pytest.approx(first_cached["eval/loss"], rel=1e-5)


def test_malformed_data_names_file_and_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    proc = cli("train", f"--model={tiny_model_dir}", f"--train_file={bad}", "--eval_file=none",
               f"--output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{bad}, line 2" in proc.stderr and "rejected" in proc.stderr and "Traceback" not in proc.stderr


def test_plan_memory_subcommand(capsys):
    from rpo_fast import cli

    assert cli.main(["plan-memory", "--model", "mistral-7b", "--max-length", "1024", "--micro-batch", "2",
                     "--optimizer", "adamw_bf16", "--gpu-gb", "80"]) == 0
    assert "optimizer_state" in capsys.readouterr().out
    assert cli.main(["plan-memory", "--model", "mistral-7b", "--gpu-gb", "8"]) == 1  # does not fit
