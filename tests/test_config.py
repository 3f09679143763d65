"""Config: defaults < preset < YAML file < --key=value overrides; typed coercion; clear errors."""
from pathlib import Path

import pytest
import yaml

from rpo_fast.config import PRESETS, TrainConfig, coerce, load_config, parse_overrides, save_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_precedence_file_then_overrides(tmp_path):
    path = write(tmp_path, "beta: 0.3\nlearning_rate: 1.0e-4\nshuffle: false\n")
    config = load_config(path, parse_overrides(["--beta=0.2", "--max_steps=7"]))
    assert (config.beta, config.learning_rate, config.shuffle, config.max_steps) == (0.2, 1e-4, False, 7)
    assert config.alpha == TrainConfig().alpha  # untouched keys keep the defaults


def test_override_types():
    config = load_config(None, parse_overrides([
        "--learning_rate=5e-6",  # YAML 1.1 reads this as a string; the field says float
        "--resume", "--eval_file=none", "--lora_target_modules=q_proj,v_proj", "--max-steps=3"]))
    assert config.learning_rate == 5e-6 and isinstance(config.learning_rate, float)
    assert config.resume is True and config.eval_file is None and config.max_steps == 3
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    assert load_config(None, {"lora_target_modules": "all-linear"}).lora_target_modules == "all-linear"


def test_paper_preset_sets_alpha_to_eta_times_beta():
    config = load_config(None, {"preset": "rpo-paper"})
    assert (config.eta, config.beta, config.sft_norm) == (0.005, 0.01, "sum")
    assert config.alpha == pytest.approx(0.005 * 0.01)
    # zephyr-gemma: same eta, beta 0.05 -> alpha follows beta
    assert load_config(None, {"preset": "rpo-paper", "beta": "0.05"}).alpha == pytest.approx(0.005 * 0.05)
    # an explicit alpha replaces the preset's eta
    explicit = load_config(None, {"preset": "rpo-paper", "alpha": "0.3"})
    assert (explicit.alpha, explicit.eta) == (0.3, None)
    assert load_config(None, {"preset": "dpo"}).alpha == 0.0
    assert set(PRESETS) >= {"rpo-paper", "dpo"}


@pytest.mark.parametrize("overrides, match", [
    ({"bta": "0.1"}, r"bta: unknown config key; did you mean \['beta'"),
    ({"beta": "abc"}, r"beta: expected float, got 'abc'"),
    ({"beta": "0"}, r"beta: expected a finite number > 0, got 0.0"),
    ({"max_steps": "1.5"}, r"max_steps: expected int, got 1.5"),
    ({"resume": "maybe"}, r"resume: expected bool"),
    ({"reference": "frozen"}, r"reference: expected one of \['model', 'adapter', 'cache', 'none'\], got 'frozen'"),
    ({"finetune": "full", "reference": "adapter"}, r"reference: 'adapter' .* needs finetune='lora'"),
    ({"max_prompt_length": "600"}, r"max_prompt_length: expected less than max_length=512"),
    ({"eta": "0.1", "alpha": "2"}, r"alpha: expected eta \* beta = 0.01"),
    ({"preset": "zephyr"}, r"preset: expected one of"),
    ({"sft_norm": "mean"}, r"sft_norm: expected one of"),
    ({"label_smoothing": "0.1", "loss_type": "ipo"}, r"label_smoothing: expected 0 with loss_type='ipo'"),
    ({"mixed_precision": "fp16"}, r"mixed_precision: expected one of \['no', 'bf16'\]"),
    # a ref_model the reference mode would ignore (the default adapter, none) is refused, not dropped
    ({"ref_model": "other"}, r"ref_model: used only with reference='model' or 'cache'.*reference='adapter'.*"
                             r"set reference: model or cache"),
    ({"ref_model": "other", "reference": "none"}, r"ref_model: .*reference='none'"),
    # numpy's seed range, named by key (numpy said only "Seed must be between 0 and 2**32 - 1")
    ({"seed": "-1"}, r"seed: expected an integer in \[0, 2\*\*32 - 1\], got -1"),
    ({"seed": "99999999999"}, r"seed: expected an integer in \[0, 2\*\*32 - 1\], got 99999999999"),
    # an empty path (--train_file=) is refused by key, not read as the working directory
    ({"train_file": ""}, r"train_file: expected a path, got ''"),
    ({"output_dir": " "}, r"output_dir: expected a path, got ' '"),
    ({"ref_cache_dir": ""}, r"ref_cache_dir: expected a path, got ''"),
    ({"model": ""}, r"model: expected a path or hub id, got ''"),
    ({"eval_file": ""}, r"eval_file: expected a path or null, got ''"),
    ({"ref_model": "", "reference": "model"}, r"ref_model: expected a path or hub id or null, got ''"),
    ({"gguf_file": ""}, r"gguf_file: expected a path or null, got ''"),
])
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(write(tmp_path, "beta: [1\n"))
    with pytest.raises(ValueError, match="warmup: unknown config key"):
        load_config(write(tmp_path, "warmup: 3\n"))
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="expected --key=value"):
        parse_overrides(["beta=0.1"])


def test_a_command_line_preset_is_not_silently_overridden_by_the_file(tmp_path):
    """defaults < preset < file < --key=value: --preset=dpo with a file that sets alpha (or rpo-paper with a file
    alpha, which would replace the preset's eta) is refused, naming the keys; the keys as overrides work."""
    path = write(tmp_path, "alpha: 0.2\nbeta: 0.1\nloss_type: sigmoid\n")
    with pytest.raises(ValueError, match=r"^preset: --preset=dpo would be overridden .*\(alpha: 0.2: "):
        load_config(path, parse_overrides(["--preset=dpo"]))
    with pytest.raises(ValueError, match=r"^preset: --preset=rpo-paper .*\(alpha: 0.2, beta: 0.1: "):
        load_config(path, parse_overrides(["--preset=rpo-paper"]))
    assert load_config(path, parse_overrides(["--preset=dpo", "--alpha=0"])).alpha == 0.0
    assert load_config(write(tmp_path, "preset: dpo\nbeta: 0.2\n")).alpha == 0.0  # a preset in the file: fine
    assert load_config(write(tmp_path, "beta: 0.3\n"), parse_overrides(["--preset=dpo"])).alpha == 0.0


def test_saved_config_round_trips(tmp_path):
    config = load_config(None, {"preset": "rpo-paper", "lora_target_modules": "q_proj,k_proj", "eval_file": "none"})
    save_config(config, tmp_path / "saved.yaml")
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["eta"] == 0.005
    assert load_config(tmp_path / "saved.yaml") == config


@pytest.mark.parametrize("mode", ["model", "adapter", "cache", "none"])
def test_every_reference_mode_from_the_command_line_a_file_and_a_saved_config(tmp_path, mode):
    """reference: none is a mode, not a missing value: it comes through --reference=none and a YAML file, and a
    run saved with it loads back (resume reads that file)."""
    assert load_config(None, parse_overrides([f"--reference={mode}"])).reference == mode
    config = load_config(write(tmp_path, f"reference: {mode}\n"))
    assert config.reference == mode
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config


def test_coerce_rejects_bool_for_int():
    with pytest.raises(ValueError, match="lora_r: expected int, got True"):
        coerce("lora_r", True)


@pytest.mark.parametrize("path", sorted(p for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")
                                        if not p.name.startswith("accelerate")),  # accelerate's own config files
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.output_dir.startswith("outputs/")


def test_optimizer_modes_of_the_trainer():
    from rpo_fast.config import load_config

    assert load_config(None, {"optimizer": "adamw_bf16"}).optimizer == "adamw_bf16"
    with pytest.raises(ValueError, match="optimizer: expected one of"):
        load_config(None, {"optimizer": "sgd"})
    in_backward = {"optimizer": "adamw_bf16_in_backward", "max_grad_norm": 0}
    assert load_config(None, in_backward).optimizer == "adamw_bf16_in_backward"
    assert load_config(None, {**in_backward, "optimizer": "adamw_fused_in_backward"}).max_grad_norm == 0
    with pytest.raises(ValueError, match=r"max_grad_norm: expected 0 with optimizer='adamw_bf16_in_backward'.*got 1.0"):
        load_config(None, {"optimizer": "adamw_bf16_in_backward"})  # the default clips at 1.0
    with pytest.raises(ValueError, match="gradient_accumulation_steps: expected 1 with optimizer=.*got 2"):
        load_config(None, {**in_backward, "gradient_accumulation_steps": 2})
    assert load_config(None, {**in_backward, "optimizer_compile": True}).optimizer_compile
    with pytest.raises(ValueError, match="optimizer_compile: expected false with optimizer='adamw'"):
        load_config(None, {"optimizer_compile": True})


def test_head_chunk_tokens_only_where_a_fwdgrad_backward_uses_it():
    assert load_config(None, {"head_chunk_tokens": 64}).head_chunk_tokens == 64
    assert load_config(None, {"head_chunk_tokens": 64, "head_backward": "fwdgrad"}).head_chunk_tokens == 64
    for other in ({"head_backward": "recompute"}, {"head_backward": "atomic"}, {"impl": "dense"}):
        with pytest.raises(ValueError, match=r"^head_chunk_tokens: expected None with head_backward="):
            load_config(None, {"head_chunk_tokens": 64, **other})


def test_fp16_full_fine_tuning_with_torch_adamw_is_refused():
    """Its fp16 moments underflow (exp_avg_sq of a 1e-3 gradient is 1e-9 < fp16's smallest subnormal), so the
    update m / (sqrt(v) + eps) explodes; LoRA (fp32 adapters) and the bf16-state optimizers are fine."""
    import torch

    opt = torch.optim.AdamW([p := torch.nn.Parameter(torch.ones(4, dtype=torch.float16))], lr=1e-6)
    p.grad = torch.tensor([1e-2, 1e-3, 1e-4, 1e-5], dtype=torch.float16)
    opt.step()
    assert bool((opt.state[p]["exp_avg_sq"][1:] == 0).all())  # the premise, on this torch
    with pytest.raises(ValueError, match=r"dtype: expected 'bfloat16' or 'float32' for full fine-tuning with "
                                         r"optimizer 'adamw'.*got 'float16'"):
        load_config(None, {"dtype": "float16", "finetune": "full", "reference": "model"})
    assert load_config(None, {"dtype": "float16", "finetune": "lora"}).dtype == "float16"
    assert load_config(None, {"dtype": "float16", "finetune": "full", "reference": "model",
                              "optimizer": "adamw_bf16"}).optimizer == "adamw_bf16"


def test_deterministic_runs_refuse_only_the_atomic_head_backward():
    from rpo_fast.config import load_config

    # The forward (any impl) and the fwdgrad / recompute backwards are deterministic: nothing is overridden.
    for impl in ("auto", "triton", "torch", "dense"):
        assert load_config(None, {"deterministic": True, "impl": impl}).impl == impl
    for backward in ("auto", "fwdgrad", "recompute"):
        assert load_config(None, {"deterministic": True, "head_backward": backward}).head_backward == backward
    with pytest.raises(ValueError, match="head_backward: expected 'auto', 'fwdgrad' or 'recompute' with deterministic"):
        load_config(None, {"deterministic": True, "head_backward": "atomic"})


def test_every_lora_target_must_name_a_module():
    """peft trains the names that match and says nothing about the others: a typo would train a fraction of the
    intended adapter (q_proj alone instead of q_proj and v_proj)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rpo_fast import modeling

    def tiny():
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1))

    targets = load_config(None, {"lora_target_modules": "q_proj,bogus_proj"}).lora_target_modules
    with pytest.raises(ValueError, match=r"lora_target_modules: .*got \['bogus_proj'\], which match none"):
        modeling.add_lora(tiny(), r=2, alpha=4, dropout=0.0, target_modules=targets)
    model = modeling.add_lora(tiny(), r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "self_attn.v_proj"])
    assert sum("lora_A" in name for name, _ in model.named_parameters()) == 2
    # a single name is a name, not a regex over full module paths: a list of one from the start, not after validate()
    assert load_config(None, {"lora_target_modules": "q_proj"}).lora_target_modules == ["q_proj"]
    assert TrainConfig(lora_target_modules="q_proj").lora_target_modules == ["q_proj"]
    with pytest.raises(ValueError, match="lora_target_modules: expected 'all-linear', module names"):
        load_config(None, {"lora_target_modules": "q_proj,"})


def test_lora_target_regex_passes_through_to_peft():
    """A string with a regex character is a regex that peft matches against full module names (re.fullmatch):
    kept as written (commas included), checked to compile and to match a module, and planned as every projection."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rpo_fast import memory_plan, modeling

    regex = r"model\.layers\.(1|2)\.self_attn\.(q|v)_proj"
    for value in (regex, r"model\.layers\.\d{1,2}\.mlp\.up_proj"):
        assert load_config(None, {"lora_target_modules": value}).lora_target_modules == value
    assert load_config(None, parse_overrides([f"--lora_target_modules={regex}"])).lora_target_modules == regex
    with pytest.raises(ValueError, match=r"lora_target_modules: expected a valid regex .*got 'q_proj\('"):
        load_config(None, {"lora_target_modules": "q_proj("})
    config = load_config(None, {"lora_target_modules": regex})
    assert memory_plan.train_config_plan_options(config)["lora_targets"] == memory_plan.LINEARS

    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1))
    model = modeling.add_lora(tiny, r=2, alpha=4, dropout=0.0, target_modules=config.lora_target_modules)
    adapted = sorted(name.removeprefix("base_model.model.") for name, _ in model.named_modules()
                     if name.endswith(".lora_A"))
    assert adapted == [f"model.layers.{i}.self_attn.{p}_proj.lora_A" for i in (1, 2) for p in ("q", "v")]
    with pytest.raises(ValueError, match=r"lora_target_modules: expected a regex matching .*which matches none"):
        modeling.add_lora(tiny, r=2, alpha=4, dropout=0.0, target_modules=r"model\.layers\.7\..*_proj")


def test_config_file_that_is_a_folder_or_missing(tmp_path):
    with pytest.raises(ValueError, match="config: expected a YAML file, got the folder"):
        load_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="config: .*missing.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_a_leading_tilde_in_every_path_key_is_expanded_once(tmp_path, monkeypatch):
    """`--output_dir=~/run` (the shell does not expand `~` after `=`) and `~` in a YAML file name the home folder
    for every reader of the config; before, the run wrote into a folder named `~` in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    keys = ("model", "ref_model", "train_file", "eval_file", "output_dir", "ref_cache_dir")
    config = load_config(None, {**{key: f"~/{key}" for key in keys}, "reference": "model"})
    assert {key: getattr(config, key) for key in keys} == {key: str(tmp_path / "home" / key) for key in keys}
    from_file = load_config(write(tmp_path, "output_dir: ~/from_yaml\ntrain_file: ~/t.jsonl\n"))
    assert (from_file.output_dir, from_file.train_file) == (str(tmp_path / "home" / "from_yaml"),
                                                            str(tmp_path / "home" / "t.jsonl"))
    assert TrainConfig(output_dir="~/direct").output_dir == str(tmp_path / "home" / "direct")
    # a hub id, a relative path and YAML's null for an optional key stay as they are
    plain = load_config(None, {"model": "org/name", "output_dir": "outputs/x~y", "eval_file": "~"})
    assert (plain.model, plain.output_dir, plain.eval_file) == ("org/name", "outputs/x~y", None)


def test_yaml_booleans_for_string_keys(tmp_path):
    """YAML 1.1 reads an unquoted no/off as false: `mixed_precision: no` (the documented value) means "no", and a
    boolean anywhere else a word is expected says to quote it."""
    for text in ("mixed_precision: no\n", "mixed_precision: off\n", "mixed_precision: false\n"):
        assert load_config(write(tmp_path, text)).mixed_precision == "no"
    with pytest.raises(ValueError, match=r"mixed_precision: expected str, got True \(bool\) \(YAML reads an "
                                         r"unquoted yes/no/on/off as true/false: quote the word"):
        load_config(write(tmp_path, "mixed_precision: yes\n"))
    with pytest.raises(ValueError, match=r"reference: expected str, got False \(bool\) \(YAML reads"):
        load_config(write(tmp_path, "reference: off\n"))
