"""Issue 8's hostile-data cases that the loader table in test_data.py does not cover, end to end from a
file to the trainer's batch plan: each has a defined behaviour (kept, truncated, dropped and counted,
or a clear error naming the setting)."""
import json

import pytest

from rpo_fast.config import load_config
from rpo_fast.data import load_preference_rows, tokenize_pairs
from rpo_fast.trainer import epoch_steps
from test_data import CharTokenizer


def rows_file(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tokenize(tmp_path, rows, **limits):
    path = rows_file(tmp_path, rows)
    return tokenize_pairs(load_preference_rows(path), CharTokenizer(), source=str(path),
                          **{"max_length": 40, "max_prompt_length": 20, **limits})


def test_duplicate_rows_are_kept_as_separate_pairs(tmp_path):
    row = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
    examples, stats = tokenize(tmp_path, [row, row, row])
    assert stats.n_kept == 3 and [ex.index for ex in examples] == [0, 1, 2]  # as TRL: a repeat weighs more


def test_prompt_longer_than_max_length_keeps_its_end_and_the_response(tmp_path):
    prompt = "x" * 100 + " what is 2 + 2?"
    examples, stats = tokenize(tmp_path, [{"prompt": prompt, "chosen": "4", "rejected": "5"}])
    ex = examples[0]
    assert len(ex.prompt_ids) == 20 and stats.n_prompt_truncated == 1  # left truncation to max_prompt_length
    assert ex.prompt_ids[0] == CharTokenizer().bos_token_id  # that keeps the BOS the tokenizer adds
    assert "".join(chr(i - 100) for i in ex.prompt_ids[1:]).endswith("2 + 2?")
    assert len(ex.prompt_ids) + len(ex.chosen_ids) <= 40


def test_empty_responses_are_dropped_and_counted_unless_eos_gives_them_a_token(tmp_path):
    # Truncation always leaves max_length - max_prompt_length >= 1 response tokens (the config refuses
    # less; test_data.py::test_truncation covers the limits), so an empty response is one that was empty.
    rows = [{"prompt": "q1", "chosen": "fine", "rejected": ""},
            {"prompt": "q2", "chosen": "ok", "rejected": "no"}]
    path = rows_file(tmp_path, rows)
    no_eos = CharTokenizer(eos=False)
    examples, stats = tokenize_pairs(load_preference_rows(path), no_eos, max_length=21, max_prompt_length=20)
    assert stats.n_dropped_empty == 1 and [ex.index for ex in examples] == [1]
    assert "dropped 1" in str(stats)
    # With an EOS token (as TRL does) the empty answer is the response [EOS]: a real, scoreable choice.
    examples, stats = tokenize(tmp_path, rows, max_length=21, max_prompt_length=20)
    assert stats.n_dropped == 0 and examples[0].rejected_ids.tolist() == [CharTokenizer().eos_token_id]


def test_dataset_smaller_than_one_step_is_a_clear_error(tmp_path):
    examples, _ = tokenize(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    config = load_config(None, {"gradient_accumulation_steps": 4})
    with pytest.raises(ValueError, match="token_budget.*fewer than one step"):
        epoch_steps(examples, config, epoch=0, world_size=1)
