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

Answers are read from a generation the way a person would grade it: the text after the last
"answer is" (up to the end of that line), or the last non-empty line when the phrase is missing.
A numeric answer is the first integer after "answer is" (the last integer of the line without the
phrase); a sorting answer must list exactly the sorted numbers, in order.

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

_ANSWER_PHRASE = re.compile(r"answer is\s*:?", re.IGNORECASE)
_INTEGER = re.compile(r"(?<!\w)-?\d+")
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _numbers(text: str) -> list[int]:
    return [int(m) for m in _INTEGER.findall(text)]


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
            return task, tuple(sorted(_numbers(m[1])))
        if task == "max":
            return task, max(_numbers(m[1]))
        if task == "count":
            return task, m[2].count(m[1])
    raise ValueError(f"question: expected a question from the embedded dataset (tasks {list(TASKS)}), "
                     f"got {question[:200]!r}")


def answer_segment(text: str) -> tuple[str, bool]:
    """The part of a generation that holds its final answer, and whether "answer is" was found.

    The text after the last "answer is" up to the end of that line; without the phrase, the last
    non-empty line.
    """
    matches = list(_ANSWER_PHRASE.finditer(text))
    if matches:
        return text[matches[-1].end():].split("\n", 1)[0].strip(), True
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else ""), False


def is_correct(question: str, generated_text: str) -> bool:
    """Whether `generated_text` answers `question` correctly (see the module docstring for the rule)."""
    task, answer = solve(question)
    segment, has_phrase = answer_segment(generated_text)
    if task == "sort":
        return tuple(_numbers(segment)) == answer
    numbers = _numbers(_THOUSANDS_SEPARATOR.sub("", segment))
    if not numbers:
        return False
    return (numbers[0] if has_phrase else numbers[-1]) == answer


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
