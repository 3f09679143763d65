"""Gold reward for the embedded dataset (`data/`): a rule that checks an answer against the question.

Every question in `data/train.jsonl` and `data/eval.jsonl` comes from one of seven templates whose
answer can be computed from the question text alone, so correctness needs no stored label:

    add      What is 37 + 48?                                                  -> 85
    sub      What is 92 - 37?                                                  -> 55
    mul      What is 7 times 8?                                                -> 56
    convert  How many minutes are in 4 hours?                                  -> 240
    sort     Sort these numbers from smallest to largest: 42, 7, 19, 3.        -> 3, 7, 19, 42
    max      Which number is the largest: 12, 45, 7, 33?                       -> 45
    count    How many times does the letter "r" appear in the word "strawberry"? -> 3

Answers are read from a generation the way a person would grade it. The answer text follows the last
"answer is" (or "answer is:") that has a letter or digit after it, blank space and line breaks right
after the phrase skipped, up to the end of that line; without such a phrase it is the last non-empty
line. In it "−" (U+2212) is a minus sign and a number may
have a decimal part ("85.0" is 85, "85.5" is no integer, so no answer here).

A numeric answer joins digit groups split by "," or a space ("12,000", "12 000") and, when the answer
text has no digits, reads the number words zero to ninety-nine ("three", "eighty-five"). After
"answer is" it is read from the first clause (up to the first ",", ";", "(" or a "." not followed by
a digit), after its last "=" if it has one ("7 * 8 = 56"): the clause must hold one number (repeats
allowed) and no "not" or "n't"; several different numbers ("85 or 86", "85-84") are no answer.
Without the phrase it is the last number of the line.

A sorting answer must list exactly the sorted numbers, in order: the numbers of the answer text, or a
list written one number per line ("3", "- 3" or "1. 3" with enumerators 1, 2, 3, ... on every line)
that starts right after "answer is" or ends the generation without the phrase.

`data/generate.py` builds the questions from the same templates with its own arithmetic and checks that
every chosen answer scores 1.0 here and every rejected one 0.0.
"""
from __future__ import annotations

import re
from typing import Any

# unit conversions: (larger unit, smaller unit) -> how many smaller units make one larger unit
UNIT_FACTORS: dict[tuple[str, str], int] = {
    ("meters", "centimeters"): 100,
    ("kilometers", "meters"): 1000,
    ("kilograms", "grams"): 1000,
    ("liters", "milliliters"): 1000,
    ("hours", "minutes"): 60,
    ("minutes", "seconds"): 60,
    ("days", "hours"): 24,
    ("weeks", "days"): 7,
    ("feet", "inches"): 12,
    ("yards", "feet"): 3,
}

_NUMBER_LIST = r"(\d+(?:, \d+)+)"
_QUESTION_PATTERNS: dict[str, re.Pattern] = {
    "add": re.compile(r"What is (\d+) \+ (\d+)\?"),
    "sub": re.compile(r"What is (\d+) - (\d+)\?"),
    "mul": re.compile(r"What is (\d+) times (\d+)\?"),
    "convert": re.compile(r"How many ([a-z]+) are in (\d+) ([a-z]+)\?"),
    "sort": re.compile(r"Sort these numbers from smallest to largest: " + _NUMBER_LIST + r"\."),
    "max": re.compile(r"Which number is the largest: " + _NUMBER_LIST + r"\?"),
    "count": re.compile(r'How many times does the letter "([a-z])" appear in the word "([a-z]+)"\?'),
}
TASKS: tuple[str, ...] = tuple(_QUESTION_PATTERNS)

_ANSWER_PHRASE = re.compile(r"answer is\s*:?\s*", re.IGNORECASE)
_NUMBER = re.compile(r"(?<!\w)-?\d+(?:\.\d+)?")
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d)[, ](?=\d{3}(?!\d))")
_CLAUSE_END = re.compile(r"[,;(]|\.(?!\d)")
_NEGATION = re.compile(r"\bnot\b|n't\b", re.IGNORECASE)
_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
          "seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER_WORD = re.compile(rf"\b(?:({'|'.join(_TENS)})(?:[- ]({'|'.join(_UNITS[1:10])}))?|({'|'.join(_UNITS)}))\b"
                          r"(?![- ]?(?:hundred|thousand|million))", re.IGNORECASE)
# One item of a list written one number per line: "3", "- 3", "* 3" or "1. 3" / "1) 3" (an enumerator).
_LIST_ITEM = re.compile(r"(?:[-*]\s*|(\d+)[.)]\s+)?(-?\d+)[.,;]?")


def _integers(question_list: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", question_list)]


def _numbers(text: str) -> list[float]:
    return [float(m) for m in _NUMBER.findall(text)]


def _number_word(m: re.Match) -> str:
    if m[3]:
        return str(_UNITS.index(m[3].lower()))
    return str(20 + 10 * _TENS.index(m[1].lower()) + (_UNITS.index(m[2].lower()) if m[2] else 0))


def solve(question: str) -> tuple[str, int | tuple[int, ...]]:
    """The task name and the correct answer of a question from the embedded dataset.

    `question` may be the bare question or any text containing it (e.g. a rendered chat prompt).
    Returns (task, answer): an int, or a tuple of ints for "sort".

    Raises:
        ValueError: when no template of the dataset matches, or a conversion names unknown units.
    """
    for task, pattern in _QUESTION_PATTERNS.items():
        m = pattern.search(question)
        if m is None:
            continue
        if task == "add":
            return task, int(m[1]) + int(m[2])
        if task == "sub":
            return task, int(m[1]) - int(m[2])
        if task == "mul":
            return task, int(m[1]) * int(m[2])
        if task == "convert":
            small, n, big = m[1], int(m[2]), m[3]
            if (big, small) not in UNIT_FACTORS:
                raise ValueError(f"question: unknown conversion from {big!r} to {small!r}; expected one of "
                                 f"{sorted(UNIT_FACTORS)}")
            return task, n * UNIT_FACTORS[(big, small)]
        if task == "sort":
            return task, tuple(sorted(_integers(m[1])))
        if task == "max":
            return task, max(_integers(m[1]))
        if task == "count":
            return task, m[2].count(m[1])
    raise ValueError(f"question: expected a question from the embedded dataset (tasks {list(TASKS)}), "
                     f"got {question[:200]!r}")


def _answer_start(text: str) -> tuple[int, bool]:
    """Where the answer text starts in `text`, and whether it follows "answer is" (see `answer_segment`)."""
    for m in reversed(list(_ANSWER_PHRASE.finditer(text))):
        if re.search(r"[^\W_]", text[m.end():].split("\n", 1)[0]):
            return m.end(), True
    lines = [m for m in re.finditer(r"[^\n]*", text) if m[0].strip()]
    return (lines[-1].start() if lines else len(text)), False


def answer_segment(text: str) -> tuple[str, bool]:
    """The part of a generation that holds its final answer, and whether "answer is" was found.

    The text after the last "answer is" (or "answer is:") that has a letter or digit after it (blank space and
    line breaks right after the phrase skipped), up to the end of that line; without one, the last non-empty line.
    """
    start, has_phrase = _answer_start(text)
    return text[start:].split("\n", 1)[0].strip(), has_phrase


def _vertical_list(text: str, start: int, has_phrase: bool) -> tuple[float, ...] | None:
    """The numbers of a list written one per line that starts at `start` (after "answer is") or ends `text`
    (without the phrase); None unless it has two or more lines and its enumerators, if any, are 1, 2, 3, ...
    on every line."""
    lines = [line.strip() for line in (text[start:] if has_phrase else text).splitlines() if line.strip()]
    if not has_phrase:
        lines.reverse()
    items = []
    for line in lines:
        if (m := _LIST_ITEM.fullmatch(line)) is None:
            break
        items.append(m)
    if not has_phrase:
        items.reverse()
    marks = [m[1] for m in items]
    if len(items) < 2 or (any(marks) and marks != [str(k) for k in range(1, len(items) + 1)]):
        return None
    return tuple(float(m[2]) for m in items)


def _numeric_answer(segment: str, has_phrase: bool) -> float | None:
    """The number a numeric answer text gives (see the module docstring), or None when it gives none or
    several."""
    segment = _THOUSANDS_SEPARATOR.sub("", segment)
    if not re.search(r"\d", segment):
        segment = _NUMBER_WORD.sub(_number_word, segment)
    if not has_phrase:
        numbers = _numbers(segment)
        return numbers[-1] if numbers else None
    clause = _CLAUSE_END.split(segment, 1)[0]
    values = set(_numbers(clause.rsplit("=", 1)[-1]))
    return values.pop() if len(values) == 1 and not _NEGATION.search(clause) else None


def is_correct(question: str, generated_text: str) -> bool:
    """Whether `generated_text` answers `question` correctly (see the module docstring for the rule)."""
    task, answer = solve(question)
    text = generated_text.replace("\u2212", "-")
    start, has_phrase = _answer_start(text)
    segment = text[start:].split("\n", 1)[0].strip()
    if task == "sort":
        listed = _vertical_list(text, start, has_phrase)
        return (listed if listed is not None else tuple(_numbers(segment))) == answer
    return _numeric_answer(segment, has_phrase) == answer


def question_text(prompt_or_row: Any) -> str:
    """The question from a row dict ({"prompt": ...}), a conversational prompt (list of messages: the
    last user message) or a plain string (returned as is)."""
    prompt = prompt_or_row["prompt"] if isinstance(prompt_or_row, dict) else prompt_or_row
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        user = [m["content"] for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if user and isinstance(user[-1], str):
            return user[-1]
    raise ValueError("prompt_or_row: expected a row dict with 'prompt', a list of {'role', 'content'} "
                     f"messages with a user message, or a string; got {type(prompt).__name__}")


def gold_reward(prompt_or_row: Any, generated_text: str) -> float:
    """1.0 when `generated_text` answers the question correctly, else 0.0.

    Args:
        prompt_or_row: a dataset row (dict with "prompt"), its prompt (list of messages) or the
            question string (any text containing the question also works).
        generated_text: the model's response, e.g. "The answer is 42."

    Raises:
        ValueError: when the prompt holds no question of the embedded dataset.
    """
    if not isinstance(generated_text, str):
        raise ValueError(f"generated_text: expected a string, got {type(generated_text).__name__}")
    return 1.0 if is_correct(question_text(prompt_or_row), generated_text) else 0.0
