"""Prints the planner's validation table of docs/memory.md ("Validation on CPU") as markdown.

For every case of `CASES` in tests/test_memory_plan.py it measures the peak of two RPO training steps of a
small random-init model on CPU (`measure`, with `LiveTensorTracker`) and asks the planner for the same
options (`predicted`), then prints one row per case and the largest errors, overall and on the held-out
configs. It takes a couple of minutes on a 2-core CPU; from the repository root:

    .venv/bin/python tools/memory_validation_table.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_memory_plan import CASES, MHA, MISTRAL_LIKE, QWEN2, measure, predicted  # noqa: E402

MiB = 2**20
HELD_OUT = (MISTRAL_LIKE, MHA, QWEN2)
# How each option of a case reads in the table ("{}" is its value); dtype comes first, "fp32" when unset.
LABELS = {
    "checkpointing": "checkpointing",
    "attention": "{} attention",
    "max_length": "{} tokens/seq",
    "pairs": "{} pair",
    "prompt": "prompt {}",
    "mode": "LoRA",
    "lora_rank": "r{}",
    "lora_dropout": "dropout {}",
    "reference": "reference {}",
    "optimizer": "{}",
    "head_backward": "head backward {}",
    "head_chunk_tokens": "head chunks of {} rows",
}


def model_name(config, first: bool, held_out: bool) -> str:
    name = f"{config['model_type']}{' tied' if config['tie_word_embeddings'] else ''} V{config['vocab_size']}"
    if first:  # the whole shape where the config first appears
        name += (f" H{config['hidden_size']} I{config['intermediate_size']} L{config['num_hidden_layers']}"
                 f" heads {config['num_attention_heads']}/{config['num_key_value_heads']}")
    return name + (" (held out)" if held_out else "")


def describe(options: dict) -> str:
    words = [options.get("dtype", "fp32")]
    words += [LABELS[key].format(value) for key, value in options.items() if key != "dtype"]
    return ", ".join(words)


print("| model | options | measured | predicted | error | peak phase |")
print("|---|---|---:|---:|---:|---|")
seen, errors, held_out_errors = set(), [], []
for config, options, _ in CASES:
    measured = measure(config, **options)
    plan = predicted(config, **options)
    error = plan.peak_bytes / measured - 1
    errors.append(abs(error))
    held_out = any(config is c for c in HELD_OUT)
    if held_out:
        held_out_errors.append(abs(error))
    first = id(config) not in seen
    seen.add(id(config))
    print(f"| {model_name(config, first, held_out)} | {describe(options)} | {measured / MiB:.2f} | "
          f"{plan.peak_bytes / MiB:.2f} | {error:+.1%} | {plan.peak_phase} |")
print(f"\n{len(CASES)} configurations; largest |error| {max(errors):.1%} overall, "
      f"{max(held_out_errors):.1%} on the held-out configs.")
