"""The gold eval of a training run: greedy answers to the first eval prompts, graded by the dataset's gold
rule (`rpo_fast.gold.gold_reward`, which stays free of torch: data/generate.py imports it)."""
from __future__ import annotations

import torch

from . import modeling
from .attention import generation_attention
from .config import TrainConfig
from .data import PreferenceExample
from .gold import gold_reward


@torch.no_grad()
def gold_accuracy(model, tokenizer, rows, examples, config: TrainConfig, device, *,
                  synced: bool = False) -> tuple[float, list[str]]:
    """Greedy answers to the first `gold_eval_samples` eval prompts, scored by the dataset's gold rule.

    `synced`: every process runs this call on the same prompts (a sharded model's forward is a collective), and
    generation runs all `gold_max_new_tokens` steps on every process (`synced_gpus`), so none waits for a
    forward another has stopped making.

    Returns (fraction correct, the generated answers)."""
    samples = examples[:config.gold_eval_samples]
    lm = modeling.base_model(model)
    was_training = model.training
    model.eval()
    width = max(len(ex.prompt_ids) for ex in samples)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ex.prompt_ids)) + ex.prompt_ids.tolist() for ex in samples],
                             device=device)
    mask = torch.tensor([[0] * (width - len(ex.prompt_ids)) + [1] * len(ex.prompt_ids) for ex in samples],
                        device=device)
    with generation_attention(lm):
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=config.gold_max_new_tokens,
                             do_sample=False, pad_token_id=pad, use_cache=True, synced_gpus=synced)
    model.train(was_training)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return sum(gold_reward(rows[ex.index], text) for ex, text in zip(samples, texts)) / len(samples), texts


def gold_answer_tokens(tokenizer, example: PreferenceExample) -> int:
    """New tokens a generation needs to hold `example`'s whole chosen answer: its chosen response's tokens up to
    the last one that changes the decoded, stripped text (the end of turn and what follows it are not needed)."""
    ids = example.chosen_ids.tolist()
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    n = len(ids)
    while n > 1 and tokenizer.decode(ids[:n - 1], skip_special_tokens=True).strip() == text:
        n -= 1
    return n


def gold_length_warning(tokenizer, examples, samples: int, max_new_tokens: int) -> str | None:
    """A warning when `max_new_tokens` (gold_max_new_tokens) cuts the chosen answer of a gold-eval prompt (the
    first `samples` eval examples): a model that gives exactly that answer would be graded wrong. None when every
    chosen answer fits."""
    lengths = [(gold_answer_tokens(tokenizer, ex), ex.index) for ex in examples[:samples]]
    need, row = max(lengths, default=(0, None))
    if need <= max_new_tokens:
        return None
    cut = sum(n > max_new_tokens for n, _ in lengths)
    return (f"warning: gold_max_new_tokens={max_new_tokens} is shorter than {cut} of the "
            f"{len(lengths)} gold-eval prompts' chosen answers (the longest, eval row {row}, takes {need} tokens): "
            f"a generation giving exactly that answer is cut and graded wrong; set gold_max_new_tokens >= {need}")
