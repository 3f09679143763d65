"""Preference data: load (prompt, chosen, rejected) rows and tokenize them into `PreferenceExample`s.

Row formats (TRL's), one per row, all three fields of one kind:

    plain:           {"prompt": "Q: ...", "chosen": " A good answer", "rejected": " A bad answer"}
    conversational:  {"prompt": [{"role": "user", "content": "..."}],
                      "chosen": [{"role": "assistant", "content": "..."}],
                      "rejected": [{"role": "assistant", "content": "..."}]}

A string prompt with whole conversations as chosen and rejected (UltraFeedback-binarized's layout) is read
as TRL's `maybe_extract_prompt` reads it: the messages both conversations start with are the prompt, the
rest the responses; the string must be the last shared user message's content.
Conversational rows may also carry TRL's `tools` (a list of tool schemas, or a JSON string of one) and
`chat_template_kwargs` (a dict), passed to the chat template. Other extra fields are kept and ignored.
Files: `.jsonl`, `.json` (a list of rows, or JSON Lines as `datasets.Dataset.to_json` writes them),
`.parquet` (needs pyarrow) or a folder written by `datasets.Dataset.save_to_disk` (needs datasets).

Tokenization (it is not TRL 1.16's, which tokenizes prompt + response together and cuts the end of the
whole sequence, `keep_start`): conversational rows go through the tokenizer's chat template (see
`_tokenize_conversation`). Plain rows: prompt and each response are tokenized separately, the prompt
starts with BOS when the tokenizer adds one by default, EOS is appended to a response that does not end
with it. Tokenizing apart means a token never spans the boundary: with SentencePiece/Metaspace tokenizers
(Llama 2, Mistral, Gemma) a response is encoded as if it started a text, which can put a space at the
boundary that `prompt + response` as one string would not have, and a response's leading space changes
its tokens only with byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen). Then, as pre-1.0 TRL did, the
prompt is left-truncated to `max_prompt_length` (a leading BOS kept), and the responses are cut so that
prompt + response fits `max_length`; pairs left with no response token are dropped and counted. A blank
response in a row ("" or whitespace) still has a token, as in TRL: EOS (plain rows) or the template's
empty assistant turn; such pairs are trained on and counted in the report, so that they are seen.

The embedded default dataset lives in the repository's `data/` folder (`default_dataset_path`); its
correctness rule is `rpo_fast.gold.gold_reward`.
"""
from __future__ import annotations

import importlib
import json
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import checks

FIELDS = ("prompt", "chosen", "rejected")
DATA_DIR = Path(__file__).resolve().parent.parent / "data"

__all__ = ["PreferenceExample", "TokenizeStats", "load_preference_rows", "validate_row", "tokenize_pairs",
           "default_dataset_path", "FIELDS", "DATA_DIR"]


@dataclass(frozen=True)
class PreferenceExample:
    """One tokenized preference pair. The model sees `prompt_ids + chosen_ids` and
    `prompt_ids + rejected_ids`; only the response tokens are scored.

    The three id sequences are stored as `array("i")` (int32, 4 bytes a token; a list of Python ints takes
    about 36, and every process of a distributed run holds the whole tokenized set). The constructor takes
    any sequence of ints (a list, a tuple, an array) and converts it. An array concatenates with an array,
    not with a list, and never compares equal to a list: use `.tolist()` for those."""

    prompt_ids: Sequence[int]  # prompt tokens (after chat template / truncation), non-empty; stored as array("i")
    chosen_ids: Sequence[int]  # chosen response tokens, non-empty; stored as array("i")
    rejected_ids: Sequence[int]  # rejected response tokens, non-empty; stored as array("i")
    index: int  # row index in the source dataset: a stable id (the reference-logp cache key)

    def __post_init__(self):
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            ids = getattr(self, name)
            if isinstance(ids, array) and ids.typecode == "i":
                continue
            try:
                object.__setattr__(self, name, array("i", ids))  # frozen dataclass
            except (TypeError, OverflowError) as e:
                raise ValueError(f"{name}: expected a sequence of int token ids in [-2**31, 2**31), got "
                                 f"{type(ids).__name__} ({e})") from e

    @property
    def chosen_length(self) -> int:
        """Tokens of the full chosen sequence (prompt + response)."""
        return len(self.prompt_ids) + len(self.chosen_ids)

    @property
    def rejected_length(self) -> int:
        """Tokens of the full rejected sequence (prompt + response)."""
        return len(self.prompt_ids) + len(self.rejected_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens this pair occupies in a packed batch: both full sequences."""
        return self.chosen_length + self.rejected_length


@dataclass
class TokenizeStats:
    """What `tokenize_pairs` did; `str()` gives the trainer's one-line start-up report.

    Truncation counts are over kept pairs; a dropped pair is counted only as dropped.
    """

    source: str = "<rows>"
    max_length: int = 0
    max_prompt_length: int = 0
    n_rows: int = 0  # rows seen
    n_kept: int = 0  # examples returned
    n_dropped_empty: int = 0  # chosen or rejected response empty after truncation (or empty to begin with)
    n_dropped_empty_prompt: int = 0  # prompt tokenized to nothing and the tokenizer has no BOS to stand in
    n_truncated: int = 0  # kept pairs with a prompt or response cut
    n_prompt_truncated: int = 0  # kept pairs whose prompt lost its beginning
    n_response_truncated: int = 0  # kept pairs with the chosen or the rejected response cut
    n_conversational: int = 0  # rows rendered with the chat template
    n_blank_response: int = 0  # kept pairs with a blank chosen or rejected text: that response is EOS / end of turn
    n_boundary_merged: int = 0  # kept chat pairs whose tokens merge across the prompt/response boundary: the
    #                             trained prompt + response ids differ from the full conversation's ids
    prompt_tokens: int = 0  # sums over kept pairs (prompt counted once per pair)
    response_tokens: int = 0  # chosen + rejected
    max_prompt_tokens: int = 0
    max_response_tokens: int = 0
    max_pair_tokens: int = 0  # largest PreferenceExample.num_tokens; one over token_budget packs alone (a warning)
    dropped_indices: list[int] = field(default_factory=list)

    @property
    def n_dropped(self) -> int:
        return self.n_dropped_empty + self.n_dropped_empty_prompt

    def __str__(self) -> str:
        kept = max(self.n_kept, 1)
        return (
            f"{self.source}: {self.n_rows} rows ({self.n_conversational} conversational), kept {self.n_kept}, "
            f"dropped {self.n_dropped} ({self.n_dropped_empty} empty response after truncation, "
            f"{self.n_dropped_empty_prompt} empty prompt)"
            + (f", {self.n_blank_response} with a blank response in the row (trained as its whitespace, if any, "
               "then EOS / end of turn)" if self.n_blank_response else "")
            + (f", {self.n_boundary_merged} conversational with tokens merged across the prompt/response "
               "boundary (trained as prompt and response tokenized apart, not as the conversation's tokens)"
               if self.n_boundary_merged else "")
            + f"; truncated {self.n_truncated} "
            f"(prompt {self.n_prompt_truncated}, response {self.n_response_truncated}) at "
            f"max_length={self.max_length}, max_prompt_length={self.max_prompt_length}; tokens per pair: "
            f"prompt mean {self.prompt_tokens / kept:.1f} max {self.max_prompt_tokens}, response mean "
            f"{self.response_tokens / (2 * kept):.1f} max {self.max_response_tokens}, packed pair mean "
            f"{(2 * self.prompt_tokens + self.response_tokens) / kept:.1f} max {self.max_pair_tokens}"
        )


# --------------------------------------------------------------------------------------------- loading


def default_dataset_path(split: str = "train") -> Path:
    """Path of the embedded dataset's `split` ("train" or "eval") in this checkout's `data/` folder.

    Raises:
        ValueError: for another split name. FileNotFoundError: when the folder is not there (the
            package was installed without its repository checkout).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
    path = DATA_DIR / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"embedded dataset: {path} not found (it ships with the repository checkout; "
                                f"regenerate it with `python data/generate.py`)")
    return path


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _check_messages(messages: list, name: str, where: str) -> None:
    if not messages:
        raise ValueError(f"{where}: field {name!r}: expected a non-empty list of messages, got []")
    for k, message in enumerate(messages):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise ValueError(f"{where}: field {name!r}, message {k}: expected {{'role': str, 'content': str}}, "
                             f"got {_describe(message)}")


def _check_utf8(value: Any, label: str, where: str, element: str = "item") -> None:
    """Raises ValueError when a string in `value` (nested lists and dicts included) cannot be encoded as
    UTF-8: a lone surrogate such as JSON's "\\ud83d", which loads but which no tokenizer accepts."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where}: {label}: text not encodable as UTF-8 ({e.reason} "
                             f"{value[e.start:e.end]!r} at character {e.start})") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_utf8(key, label, where)
            _check_utf8(item, f"{label}, {key!r}" if isinstance(key, str) else label, where)
    elif isinstance(value, list):
        for k, item in enumerate(value):
            _check_utf8(item, f"{label}, {element} {k}", where)


_RESERVED_TEMPLATE_KWARGS = ("conversation", "messages", "tools", "tokenize", "add_generation_prompt")


def _template_extras(row: dict, where: str) -> dict:
    """The keyword arguments that a conversational row's TRL columns `tools` (a list of tool schemas, or
    a JSON string of one) and `chat_template_kwargs` (a dict) add to `apply_chat_template`; absent or
    None columns add nothing.

    Raises:
        ValueError: naming `where` and the field, for a wrong type or a string `tools` that is not a JSON list.
    """
    extras = {}
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: field 'tools': a string must be a JSON list of tools, got invalid "
                             f"JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(tools, list):
            raise ValueError(f"{where}: field 'tools': a string must be a JSON list of tools, got JSON "
                             f"{_describe(tools)}")
    if tools is not None:
        if not isinstance(tools, list):
            raise ValueError(f"{where}: field 'tools': expected a list of tools (or a JSON string of one), "
                             f"got {_describe(tools)}")
        extras["tools"] = tools
    kwargs = row.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise ValueError(f"{where}: field 'chat_template_kwargs': expected an object with string keys, "
                             f"got {_describe(kwargs)}")
        reserved = [k for k in kwargs if k in _RESERVED_TEMPLATE_KWARGS]
        if reserved:
            raise ValueError(f"{where}: field 'chat_template_kwargs': key(s) {reserved} are set by rpo-fast "
                             f"itself (tools go in the row's 'tools' field)")
        extras.update(kwargs)
    return extras


def validate_row(row: Any, where: str) -> str:
    """Checks one row and returns its format, "plain" or "conversational" (also for a string prompt with whole
    conversations as chosen and rejected: see `_check_embedded_prompt`).

    Raises:
        ValueError: starting with `where` (e.g. "train.jsonl, line 3"), naming the field, what was
            expected and what came: a non-object row, a missing field, a wrong type, mixed formats,
            a malformed or empty message list, a conversational row's malformed `tools` or
            `chat_template_kwargs`, text that cannot be encoded as UTF-8 (a lone surrogate).
    """
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with fields {list(FIELDS)}, got {_describe(row)}")
    missing = [name for name in FIELDS if name not in row]
    if missing:
        hint = ""
        if missing == ["prompt"] and isinstance(row.get("chosen"), list):
            hint = " (implicit-prompt rows are not supported: move the shared messages into 'prompt')"
        raise ValueError(f"{where}: missing field(s) {missing}; expected {list(FIELDS)}, got {sorted(row)}{hint}")
    prompt = row["prompt"]
    if isinstance(prompt, str) and isinstance(row["chosen"], list) and isinstance(row["rejected"], list):
        _check_embedded_prompt(row, where)
        return "conversational"
    if isinstance(prompt, str):
        for name in ("chosen", "rejected"):
            if not isinstance(row[name], str):
                raise ValueError(f"{where}: field {name!r}: expected a string like 'prompt' (plain format), "
                                 f"got {_describe(row[name])}")
        for name in FIELDS:
            _check_utf8(row[name], f"field {name!r}", where)
        return "plain"
    if isinstance(prompt, list):
        for name in FIELDS:
            if not isinstance(row[name], list):
                raise ValueError(f"{where}: field {name!r}: expected a list of messages like 'prompt' "
                                 f"(conversational format), got {_describe(row[name])}")
            _check_messages(row[name], name, where)
            _check_utf8(row[name], f"field {name!r}", where, element="message")
        _check_template_fields(row, where)
        return "conversational"
    raise ValueError(f"{where}: field 'prompt': expected a string or a list of {{'role', 'content'}} messages, "
                     f"got {_describe(prompt)}")


def _check_template_fields(row: dict, where: str) -> None:
    for name in ("tools", "chat_template_kwargs"):
        _check_utf8(row.get(name), f"field {name!r}", where)
    _template_extras(row, where)


def _shared_messages(chosen: list, rejected: list) -> int:
    """How many leading messages two conversations share."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n


def _check_embedded_prompt(row: dict, where: str) -> None:
    """A string `prompt` with whole conversations as `chosen` and `rejected` (UltraFeedback-binarized's layout):
    as TRL's `maybe_extract_prompt` does, the messages the two share are the prompt and the rest the responses;
    the string must be the content of the last user message they share (else the columns do not belong together).
    """
    for name in ("chosen", "rejected"):
        _check_messages(row[name], name, where)
        _check_utf8(row[name], f"field {name!r}", where, element="message")
    _check_utf8(row["prompt"], "field 'prompt'", where)
    chosen, rejected = row["chosen"], row["rejected"]
    n = _shared_messages(chosen, rejected)
    users = [m["content"] for m in chosen[:n] if m["role"] == "user"]
    layout = ("field 'prompt' is a string and 'chosen'/'rejected' are whole conversations (the UltraFeedback "
              "layout; their shared leading messages are the prompt)")
    if not users or users[-1].strip() != row["prompt"].strip():
        shared = f"their last shared user message is {_describe(users[-1])}" if users else \
            "they share no user message"
        raise ValueError(f"{where}: {layout}: expected 'prompt' to be the last user message both conversations "
                         f"start with, got {_describe(row['prompt'])} while {shared}")
    if n == len(chosen) or n == len(rejected):
        raise ValueError(f"{where}: {layout}: expected 'chosen' and 'rejected' to go on past their "
                         f"{n} shared message(s) (the responses), got {len(chosen)} and {len(rejected)} messages")
    _check_template_fields(row, where)


def _with_prompt_messages(row: dict) -> dict:
    """`row` with a list-of-messages prompt: an UltraFeedback-layout row (see `_check_embedded_prompt`) becomes
    its shared messages as `prompt` and the rest as `chosen` / `rejected`; other rows come back as they are."""
    if not isinstance(row["prompt"], str):
        return row
    n = _shared_messages(row["chosen"], row["rejected"])
    return {**row, "prompt": row["chosen"][:n], "chosen": row["chosen"][n:], "rejected": row["rejected"][n:]}


def _load_jsonl(path: Path) -> list[dict]:
    rows = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        where = f"{path}, line {lineno}"
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at column "
                             f"{e.start + 1})") from None
        if not line.strip():
            continue  # blank lines (a trailing newline, an empty line) carry no row
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        validate_row(row, where)
        rows.append(row)
    return rows


def _is_json_lines(text: str) -> bool:
    """Whether every non-blank line of `text` is a JSON value of its own."""
    try:
        for line in text.split("\n"):
            if line.strip():
                json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _load_json(path: Path) -> list[dict]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not valid UTF-8 (byte {data[e.start:e.start + 1]!r})") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and _is_json_lines(text):
            return _load_jsonl(path)  # JSON Lines, as datasets.Dataset.to_json writes a .json file by default
        raise ValueError(f"{path}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(rows, dict) and "\n" not in text.strip():
        return _load_jsonl(path)  # one object on one line: the JSON Lines of a one-row dataset
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows (use .jsonl for one object per line), "
                         f"got {type(rows).__name__}")
    for i, row in enumerate(rows):
        validate_row(row, f"{path}, row {i}")
    return rows


def import_reader(path: str | os.PathLike):
    """The optional module that reading `path` needs: `pyarrow.parquet` for a .parquet file, `datasets` for a
    folder (a `save_to_disk` dataset); None for JSON files, which need nothing beyond the standard library.

    Raises:
        ImportError: naming the file, the missing package and the `data` extra that installs it.
    """
    path = Path(path)
    if path.is_dir():
        module, package, what = "datasets", "datasets", "a folder saved by datasets.Dataset.save_to_disk"
    elif path.suffix.lower() == ".parquet":
        module, package, what = "pyarrow.parquet", "pyarrow", ".parquet files"
    else:
        return None
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{path}: reading {what} needs the `{package}` package, which is not installed "
                          f"(pip install {package}, or in this checkout pip install -e '.[data]')") from None


def _load_parquet(path: Path) -> list[dict]:
    pq = import_reader(path)
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for files it cannot read
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    for i, row in enumerate(rows):
        validate_row(row, f"{path}, row {i}")
    return rows


def _load_saved_dataset(path: Path) -> list[dict]:
    datasets = import_reader(path)
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError for folders that are not datasets, among others
        raise ValueError(f"{path}: expected a folder written by datasets.Dataset.save_to_disk "
                         f"({type(e).__name__}: {e})") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"{path}: expected one split, got a DatasetDict with splits {list(dataset)}; "
                         f"pass {path / next(iter(dataset), 'SPLIT')} instead")
    rows = dataset.to_list()
    for i, row in enumerate(rows):
        validate_row(row, f"{path}, row {i}")
    return rows


def load_preference_rows(path: str | os.PathLike) -> list[dict]:
    """Reads preference rows from `.jsonl`, `.json` (a list of rows, or JSON Lines: one row per line, as
    `datasets.Dataset.to_json` writes it), `.parquet` or a `save_to_disk` folder.

    Returns:
        the rows, validated (see `validate_row`), in file order; blank JSONL lines are skipped, so a
        row's position in this list (its `PreferenceExample.index`) is its stable id.

    Raises:
        FileNotFoundError: when `path` does not exist.
        ValueError: for malformed input, naming the file and the line (JSONL, JSON syntax) or row index:
            invalid JSON or UTF-8, a row that is not an object, missing fields, wrong types, mixed
            formats, no rows at all, an unsupported file type.
        ImportError: for .parquet without pyarrow, or a dataset folder without `datasets`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"preference data: {path} does not exist")
    if path.is_dir():
        rows = _load_saved_dataset(path)
    elif path.suffix.lower() == ".jsonl":
        rows = _load_jsonl(path)
    elif path.suffix.lower() == ".json":
        rows = _load_json(path)
    elif path.suffix.lower() == ".parquet":
        rows = _load_parquet(path)
    else:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected .jsonl, .json, .parquet or "
                         f"a folder saved by datasets.Dataset.save_to_disk")
    if not rows:
        raise ValueError(f"{path}: no rows (empty file); expected at least one row with fields {list(FIELDS)}")
    return rows


# ----------------------------------------------------------------------------------------- tokenizing


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without any special tokens added by the tokenizer itself."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str, extras: dict) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **extras)
    except Exception as e:  # no template, template errors (e.g. role order rules), ...
        raise ValueError(f"{where}: tokenizer.apply_chat_template failed ({type(e).__name__}: {e}); "
                         f"conversational rows need a tokenizer with a chat template") from e
    if not isinstance(text, str):
        raise ValueError(f"{where}: tokenizer.apply_chat_template(tokenize=False) returned "
                         f"{type(text).__name__}, expected str")
    return text


def _common_prefix(*texts: str) -> str:
    n = 0
    for chars in zip(*texts):
        if any(c != chars[0] for c in chars):
            break
        n += 1
    return texts[0][:n]


def _tokenize_conversation(tokenizer, row: dict, where: str) -> tuple[list[int], list[int], list[int], bool]:
    """Prompt and response ids of a conversational row, the way TRL's `maybe_apply_chat_template` does it:
    the prompt is the rendering with the generation prompt, a response is what the full conversation's
    rendering adds after it. The prompt text is cut back to the prefix that all three renderings share
    (templates like DeepSeek-R1's add a `<think>` to the generation prompt that the full rendering lacks).

    Tokens: when the prompt's ids are a prefix of the full conversation's ids, the response is the ids
    that follow (exactly what the model sees); otherwise (a token merged across the boundary, e.g.
    SmolLM2's generation prompt ends with "\n" and a response starting with "\n" makes "\n\n") the
    response text is tokenized on its own, so the trained prompt + response ids differ from the full
    conversation's. TRL 1.16 instead cuts the prompt back to the common token prefix and warns; here such
    pairs are counted (`TokenizeStats.n_boundary_merged`, in the start-up report). The last value
    returned says whether that happened.
    """
    extras = _template_extras(row, where)  # the row's `tools` and `chat_template_kwargs`, as TRL passes them
    prompt_text = _render(tokenizer, row["prompt"], True, where, extras)
    full_texts = [_render(tokenizer, row["prompt"] + row[name], False, where, extras)
                  for name in ("chosen", "rejected")]
    prompt_text = _common_prefix(prompt_text, *full_texts)
    prompt_ids = _encode(tokenizer, prompt_text)
    responses, merged = [], False
    for full_text in full_texts:
        full_ids = _encode(tokenizer, full_text)
        if full_ids[:len(prompt_ids)] == prompt_ids:
            responses.append(full_ids[len(prompt_ids):])
        else:
            responses.append(_encode(tokenizer, full_text[len(prompt_text):]))
            merged = True
    return prompt_ids, responses[0], responses[1], merged


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text by default (Llama, Mistral, Gemma do; GPT-2-style
    byte-level BPE tokenizers such as SmolLM2's do not): `tokenizer("x")` starts with BOS and the same
    text without special tokens does not."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_specials = list(tokenizer("x")["input_ids"])
    return with_specials[:1] == [bos] and _encode(tokenizer, "x")[:1] != [bos]


def _tokenize_plain(tokenizer, row: dict, bos: int | None) -> tuple[list[int], list[int], list[int]]:
    """Plain rows: each part tokenized on its own without special tokens (TRL 1.16 tokenizes prompt +
    response jointly; see the module docstring for what tokenizing apart changes), `bos` (the tokenizer's
    default BOS, or None) put first in the prompt unless already there, EOS appended to each response
    that does not already end with it (when the tokenizer has one), as TRL 1.16 does."""
    eos = getattr(tokenizer, "eos_token_id", None)

    def response(text: str) -> list[int]:
        ids = _encode(tokenizer, text)
        # a text that already ends with the EOS token keeps that one EOS (TRL 1.16 appends none then)
        return ids if eos is None or ids[-1:] == [eos] else ids + [eos]

    prompt = _encode(tokenizer, row["prompt"])
    if bos is not None and prompt[:1] != [bos]:
        prompt = [bos] + prompt  # the BOS the tokenizer adds by default, as TRL 1.16 prepends it
    return prompt, response(row["chosen"]), response(row["rejected"])


def _is_blank(response: str | list[dict]) -> bool:
    """A response without text: "" or whitespace, or messages whose contents all are."""
    if isinstance(response, str):
        return not response.strip()
    return all(not message["content"].strip() for message in response)


def _check_length(name: str, value: Any, minimum: int) -> None:
    if not checks.is_int(value) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def tokenize_pairs(
    rows: Iterable[dict],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    source: str = "<rows>",
) -> tuple[list[PreferenceExample], TokenizeStats]:
    """Tokenizes preference rows into examples, truncating as pre-1.0 TRL did (the prompt from the left).

    Conversational rows are rendered with `tokenizer.apply_chat_template` (see
    `_tokenize_conversation`): the prompt ends with the generation prompt, each response holds the
    assistant turn(s) including the template's end-of-turn tokens; no extra EOS is appended. Plain rows:
    prompt and responses are tokenized separately without special tokens; the prompt then starts with BOS
    when the tokenizer adds one by default (Llama, Mistral, Gemma), and EOS is appended to each response
    that does not already end with it. A prompt that tokenizes to nothing becomes [BOS] (so the first
    response token has a position that predicts it), or the pair is dropped when there is no BOS.

    Truncation: the prompt keeps its last `max_prompt_length` tokens; when the tokenizer adds BOS by
    default, a prompt that starts with it (plain, or rendered by the chat template) keeps it: BOS + its
    last `max_prompt_length - 1` tokens. This left truncation is pre-1.0 TRL's (TRL 1.16 cuts prompt +
    response at the end instead). Then each response keeps its first `max_length - len(prompt)` tokens. A
    pair with an empty chosen or rejected response after that is dropped and counted in
    `TokenizeStats.n_dropped_empty`. A blank response text ("" or whitespace) is
    not empty once tokenized (EOS, or the template's end of turn): such kept pairs are counted in
    `TokenizeStats.n_blank_response`.

    Args:
        rows: dicts with "prompt", "chosen", "rejected" (see `validate_row`); row i gets index i.
        tokenizer: a Hugging Face tokenizer (`__call__`, `apply_chat_template`, `eos_token_id`,
            `bos_token_id`).
        max_length: the most tokens of prompt + one response, >= 2.
        max_prompt_length: the most prompt tokens, >= 1.
        source: a name for error messages and the report (e.g. the file path).

    Returns:
        (examples in row order, stats).

    Raises:
        ValueError: for bad lengths, malformed rows ("<source>, row i: ..."), or a chat template failure.
    """
    _check_length("max_length", max_length, 2)
    _check_length("max_prompt_length", max_prompt_length, 1)
    stats = TokenizeStats(source=source, max_length=max_length, max_prompt_length=max_prompt_length)
    bos = getattr(tokenizer, "bos_token_id", None)
    plain_bos = bos if _adds_bos(tokenizer) else None  # asked once per call: the BOS prompts start with
    examples = []
    for index, row in enumerate(rows):
        where = f"{source}, row {index}"
        stats.n_rows += 1
        if validate_row(row, where) == "conversational":
            row = _with_prompt_messages(row)
            stats.n_conversational += 1
            prompt_ids, chosen_ids, rejected_ids, merged = _tokenize_conversation(tokenizer, row, where)
        else:
            prompt_ids, chosen_ids, rejected_ids = _tokenize_plain(tokenizer, row, plain_bos)
            merged = False
        if not prompt_ids:
            if bos is None:
                stats.n_dropped_empty_prompt += 1
                stats.dropped_indices.append(index)
                continue
            prompt_ids = [bos]

        prompt_cut = len(prompt_ids) > max_prompt_length
        if prompt_cut and plain_bos is not None and prompt_ids[0] == plain_bos:
            # left truncation that keeps a leading BOS: BOS + the last max_prompt_length - 1 tokens. Only for
            # tokenizers that add BOS themselves: SmolLM2's bos_token is <|im_start|>, which starts every
            # ChatML turn and is no sequence start to keep
            prompt_ids = [bos] + prompt_ids[len(prompt_ids) - max_prompt_length + 1:]
        elif prompt_cut:
            prompt_ids = prompt_ids[-max_prompt_length:]  # left truncation: keep the end, next to the response
        budget = max(max_length - len(prompt_ids), 0)
        response_cut = len(chosen_ids) > budget or len(rejected_ids) > budget
        chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
        if not chosen_ids or not rejected_ids:
            stats.n_dropped_empty += 1
            stats.dropped_indices.append(index)
            continue

        example = PreferenceExample(prompt_ids=prompt_ids, chosen_ids=chosen_ids, rejected_ids=rejected_ids,
                                    index=index)
        examples.append(example)
        stats.n_kept += 1
        stats.n_blank_response += _is_blank(row["chosen"]) or _is_blank(row["rejected"])
        stats.n_boundary_merged += merged
        stats.n_prompt_truncated += prompt_cut
        stats.n_response_truncated += response_cut
        stats.n_truncated += prompt_cut or response_cut
        stats.prompt_tokens += len(prompt_ids)
        stats.response_tokens += len(chosen_ids) + len(rejected_ids)
        stats.max_prompt_tokens = max(stats.max_prompt_tokens, len(prompt_ids))
        stats.max_response_tokens = max(stats.max_response_tokens, len(chosen_ids), len(rejected_ids))
        stats.max_pair_tokens = max(stats.max_pair_tokens, example.num_tokens)
    return examples, stats
