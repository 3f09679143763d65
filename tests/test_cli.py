"""The command line, run as a user would (`python -m rpo_fast.cli`), on the tiny model."""
import subprocess
import sys

import pytest
import yaml

from tiny_lm import REPO, build_tiny_model_dir, load_json_lines, subprocess_env, tiny_overrides

ENV = subprocess_env()


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
    assert len(caches) == 2 and f"reference log-probs (train): {tmp_path / 'ref_cache'}" in proc.stdout
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


# --- bad inputs: exit 2, one line naming the key, before any model loads -------------------------------------

def bad_input_cases(tmp: "Path") -> list[tuple[str, list[str], str]]:
    """(case id, command line, the key its one-line error must name)."""
    (tmp / "empty_model").mkdir(exist_ok=True)
    (tmp / "a_file").write_text("not a folder")
    own = tmp / "own.jsonl"
    own.write_text('{"prompt": "Name a colour.", "chosen": " Blue.", "rejected": " Seven."}\n')
    train = ["train", f"--output_dir={tmp / 'run'}"]
    return [
        ("model_missing", [*train, f"--model={tmp / 'no_such_model'}"], "model"),
        ("model_hub_id_offline", [*train, "--model=rpo-fast-test-org/no-such-model"], "model"),
        ("model_empty_folder", [*train, f"--model={tmp / 'empty_model'}"], "model"),
        ("model_plain_file", [*train, f"--model={tmp / 'a_file'}"], "model"),
        ("ref_model_empty_folder", [*train, "--reference=model", f"--ref_model={tmp / 'empty_model'}"], "ref_model"),
        ("output_dir_is_a_file", ["train", f"--output_dir={tmp / 'a_file'}"], "output_dir"),
        ("output_dir_unwritable", ["train", "--output_dir=/proc/rpo-fast-test-run"], "output_dir"),
        ("ref_cache_dir_under_a_file", [*train, "--reference=cache", f"--ref_cache_dir={tmp / 'a_file' / 'cache'}"],
         "ref_cache_dir"),
        ("ref_cache_dir_unwritable", [*train, "--reference=cache", "--ref_cache_dir=/proc/rpo-fast-test-cache"],
         "ref_cache_dir"),
        ("precompute_ref_cache_dir_is_a_file", ["precompute-ref", f"--ref_cache_dir={tmp / 'a_file'}"],
         "ref_cache_dir"),
        ("config_is_a_folder", ["train", "--config", str(tmp)], "config"),
        ("impl_triton_without_gpu", [*train, "--impl=triton"], "impl"),
        ("atomic_backward_without_gpu", [*train, "--head_backward=atomic"], "head_backward"),
        ("head_backward_with_dense", [*train, "--impl=dense", "--head_backward=fwdgrad"], "head_backward"),
        ("lora_target_not_a_name", [*train, "--lora_target_modules=q_proj,"], "lora_target_modules"),
        ("train_file_missing", [*train, f"--train_file={tmp / 'missing.jsonl'}"], "train_file"),
        ("embedded_eval_for_own_data", [*train, f"--train_file={own}"], "eval_file"),
        ("gold_rule_on_own_eval", [*train, f"--train_file={own}", f"--eval_file={own}", "--gold_eval_samples=1"],
         "gold_eval_samples"),
        ("resume_and_overwrite", [*train, "--resume", "--overwrite"], "resume"),
        ("demo_without_eval_file_keeps_gold", ["train", "--config", "configs/demo.yaml", "--eval_file=null",
                                               f"--output_dir={tmp / 'run'}"], "gold_eval_samples"),
        ("precompute_model_missing", ["precompute-ref", f"--model={tmp / 'no_such_model'}"], "model"),
        ("plan_config_missing", ["plan-memory", "--config", str(tmp / "missing.yaml")], "config"),
        ("plan_gpu_gb_nan", ["plan-memory", "--model", "mistral-7b", "--gpu-gb", "nan"], "--gpu-gb"),
        ("plan_gpu_gb_zero", ["plan-memory", "--model", "mistral-7b", "--gpu-gb", "0"], "--gpu-gb"),
        ("plan_gpu_gb_negative", ["plan-memory", "--model", "mistral-7b", "--gpu-gb=-1"], "--gpu-gb"),
        ("plan_bad_override", ["plan-memory", "--config", "configs/demo.yaml", "--token_budget=0"], "token_budget"),
    ]



@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails any attempt to load a model or tokenizer: the errors under test must come before that."""
    from rpo_fast import modeling

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the bad input was reported")

    for name in ("load_causal_lm", "load_tokenizer"):
        monkeypatch.setattr(modeling, name, refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub-like name must never reach the network
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a user's CPU machine: impl=triton cannot run
    monkeypatch.chdir(REPO)


CASE_IDS = ["model_missing", "model_hub_id_offline", "model_empty_folder", "model_plain_file",
            "ref_model_empty_folder", "output_dir_is_a_file", "output_dir_unwritable", "ref_cache_dir_under_a_file",
            "ref_cache_dir_unwritable", "precompute_ref_cache_dir_is_a_file", "config_is_a_folder",
            "impl_triton_without_gpu", "atomic_backward_without_gpu", "head_backward_with_dense",
            "lora_target_not_a_name", "train_file_missing", "embedded_eval_for_own_data",
            "gold_rule_on_own_eval", "resume_and_overwrite", "demo_without_eval_file_keeps_gold",
            "precompute_model_missing", "plan_config_missing",
            "plan_gpu_gb_nan", "plan_gpu_gb_zero", "plan_gpu_gb_negative", "plan_bad_override"]


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_exits_2_with_one_line_naming_the_key(case, tmp_path, capsys, no_model_loading):
    from rpo_fast import cli

    cases = {name: (argv, key) for name, argv, key in bad_input_cases(tmp_path)}
    assert set(cases) == set(CASE_IDS)
    argv, key = cases[case]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse-style exits
        code = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert len(lines) == 1 and f"error: {key}" in lines[0], err[-2000:]


@pytest.mark.parametrize("package, modules, data_name", [
    ("pyarrow", ["pyarrow", "pyarrow.parquet"], "own.parquet"),
    ("datasets", ["datasets"], "own_dataset"),
])
def test_data_reader_not_installed_exits_2_before_loading(package, modules, data_name, tmp_path, capsys,
                                                          monkeypatch, no_model_loading):
    """A .parquet file without pyarrow (a save_to_disk folder without datasets) is refused up front, in one line
    naming the key, the package and the extra that installs it, not as a traceback after the tokenizer loads."""
    from rpo_fast import cli

    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    data = tmp_path / data_name
    if data.suffix:
        data.write_bytes(b"PAR1")
    else:
        data.mkdir()
    code = cli.main(["train", f"--output_dir={tmp_path / 'run'}", f"--train_file={data}", "--eval_file=null",
                     "--gold_eval_samples=0"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "error: train_file" in lines[0] and f"`{package}`" in lines[0] and "'.[data]'" in lines[0], lines


@pytest.mark.parametrize("value", ["1", "true", "YES", "On", "0", "false", "no", ""])
@pytest.mark.parametrize("name", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_hub_offline_reads_the_values_huggingface_hub_reads(name, value, monkeypatch):
    """HF_HUB_OFFLINE=true is offline, as for huggingface_hub (1, ON, YES, TRUE in any case): an uncached hub id
    is then refused before loading; other values leave the hub online."""
    from rpo_fast.preflight import check_model_source, hub_offline

    for other in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, value)
    offline = value.upper() in {"1", "ON", "YES", "TRUE"}
    assert hub_offline() == offline
    if offline:
        with pytest.raises(ValueError, match="model: 'rpo-fast-test-org/no-such-model' is not a local folder"):
            check_model_source("model", "rpo-fast-test-org/no-such-model")


def test_a_gguf_file_is_accepted_whatever_the_case_of_its_suffix(tmp_path):
    from rpo_fast.preflight import check_model_source

    for name in ("model.gguf", "MODEL.GGUF", "model.Gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
        check_model_source("model", str(tmp_path / name))
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="model: expected a Hugging Face model folder, a .gguf file or a hub id, "
                                         "got the file"):
        check_model_source("model", str(tmp_path / "model.bin"))


@pytest.mark.parametrize("command, entry", [("train", "train"), ("precompute-ref", "precompute_reference")])
def test_out_of_memory_anywhere_exits_4_with_the_reason(command, entry, monkeypatch, capsys):
    """Out of memory outside a training step (model load, eval, the reference pass): exit 4, no traceback."""
    import torch

    from rpo_fast import cli, trainer

    def out_of_memory(config):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB.\nmore details")

    monkeypatch.setattr(trainer, entry, out_of_memory)
    assert cli.main([command]) == 4
    err = capsys.readouterr().err
    assert f"rpo-fast {command}: CUDA out of memory outside a training step" in err
    assert "Tried to allocate 3.00 GiB" in err and "more details" not in err and "plan-memory" in err
    assert "Traceback" not in err


def test_out_of_memory_in_a_training_step_exits_4_with_the_advice(monkeypatch, capsys):
    """Out of memory in a training step (the trainer's TrainingOutOfMemoryError, with its advice): exit 4, as the
    README's exit-code table says for any CUDA out of memory, and the message in one paragraph, no traceback."""
    from rpo_fast import cli, trainer

    def out_of_memory(config):
        raise trainer.oom.TrainingOutOfMemoryError("CUDA out of memory at step 2, in a micro-batch of 4 pairs. "
                                                   "To fit: lower token_budget.")

    monkeypatch.setattr(trainer, "train", out_of_memory)
    assert cli.main(["train"]) == 4
    err = capsys.readouterr().err
    assert err == "rpo-fast train: CUDA out of memory at step 2, in a micro-batch of 4 pairs. To fit: lower " \
        "token_budget.\n"


def test_precompute_ref_warns_when_train_would_not_read_the_cache(tiny_model_dir, tmp_path, capsys):
    """precompute-ref under the default reference (adapter) writes a cache that train reads only with
    reference: cache: it says so."""
    from rpo_fast import cli

    values = tiny_overrides(tiny_model_dir, tmp_path, finetune="lora", reference="adapter", eval_file=None)
    config = write_config(tmp_path / "tiny.yaml", values)
    assert cli.main(["precompute-ref", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "warning: reference is 'adapter': train reads these log-probs only with reference: cache" in out, out
    [cache] = (tmp_path / "ref_cache").glob("ref-logps-*.pt")
    assert out.count(str(cache)) == 1, out  # printed once (it was printed twice: a log line, then the CLI's)


def test_a_model_folder_without_its_tokenizer_is_named_in_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A folder with the model's files but not the tokenizer's (save_pretrained of the model only): one line naming
    model and the files it lacks, not transformers' five-line message."""
    import shutil

    from rpo_fast import cli

    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, folder / name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(REPO)
    assert cli.main(["train", f"--model={folder}", f"--output_dir={tmp_path / 'run'}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"error: model: {folder} has no tokenizer files" in lines[0], lines
    assert "tokenizer.json" in lines[0] and "save_pretrained" in lines[0]


def test_a_read_only_ref_cache_dir_that_holds_caches_is_not_refused(tmp_path, monkeypatch):
    """reference: cache only reads the files of a filled cache: a shared read-only one is checked for writing only
    when it holds no cache yet."""
    import pathlib

    from rpo_fast import preflight
    from rpo_fast.config import TrainConfig

    def read_only(self, data):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "write_bytes", read_only)
    config = TrainConfig(reference="cache", ref_cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="ref_cache_dir: expected a folder this process can write"):
        preflight.check_ref_cache_dir(config)
    (tmp_path / "ref-logps-0123.pt").touch()
    preflight.check_ref_cache_dir(config)


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied", "/srv/cache/ref-logps-x.pt"),
                                   NotADirectoryError(20, "Not a directory", "/data/train.jsonl/cache")])
def test_a_path_that_cannot_be_written_exits_2_in_one_line(error, monkeypatch, capsys):
    """An unwritable path met after the start-up checks: one line with the path, exit 2, as for other bad paths."""
    from rpo_fast import cli, trainer

    def fail(config):
        raise error

    monkeypatch.setattr(trainer, "train", fail)
    assert cli.main(["train"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rpo-fast train: error:") and error.filename in lines[0], lines


def test_aot_has_help():
    proc = subprocess.run([sys.executable, "-m", "rpo_fast.aot", "--help"], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "ARCH" in proc.stdout and "Traceback" not in proc.stderr, proc.stderr


def test_train_help_lists_every_config_key_with_its_default(capsys):
    import dataclasses

    from rpo_fast import cli
    from rpo_fast.config import TrainConfig

    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for field in dataclasses.fields(TrainConfig):
        assert f"  --{field.name}=" in out, field.name
    assert "--token_budget=4096" in out and "--eval_file=data/eval.jsonl" in out and "--print-config" in out
    assert "packed tokens per micro-batch" in out  # the comment beside the field
    assert "exit status" in out


def test_plan_memory_plans_the_demo_config_with_train_overrides(capsys):
    import json

    from rpo_fast import cli

    plans = {}
    for budget in (1024, 2048):
        assert cli.main(["plan-memory", "--config", "configs/demo.yaml", f"--token_budget={budget}",
                         "--max_pairs_per_micro_batch=null", "--json"]) == 0
        plans[budget] = json.loads(capsys.readouterr().out)
    assert plans[1024]["options"]["model"] == "smollm2-135m-instruct"
    assert [plans[b]["options"]["tokens_per_micro_batch"] for b in (1024, 2048)] == [1024, 2048]
    assert plans[1024]["peak_bytes"] < plans[2048]["peak_bytes"]  # the override reached the plan
    # train-style overrides alone plan the train command's defaults with them
    assert cli.main(["plan-memory", "--model=mistral-7b", "--finetune=full", "--reference=cache",
                     "--dtype=bfloat16", "--gradient_checkpointing", "--optimizer=adamw_bf16", "--gpu-gb", "80"]) == 0
