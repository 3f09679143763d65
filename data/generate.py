"""Generate the embedded preference dataset: data/train.jsonl and data/eval.jsonl.

    python data/generate.py            # (re)write the two files next to this script
    python data/generate.py --check    # exit 1 unless the committed files match the generator byte for byte
    python data/generate.py --out DIR  # write somewhere else

Each row is a conversational preference pair in TRL's format:

    {"prompt": [{"role": "user", "content": "What is 37 + 48?"}],
     "chosen": [{"role": "assistant", "content": "The answer is 85."}],
     "rejected": [{"role": "assistant", "content": "The answer is 75."}],
     "task": "add", "error": "carry_error"}

The chosen answer is computed here; the rejected one applies a typical mistake (`error`): off by one, a
dropped carry or borrow, the wrong operation, a wrong conversion factor, a reversed or swapped order.
Questions are unique across both files up to the order of their numbers where that order does not change the
question (`canonical_key`): "What is 9 times 11?" and "What is 11 times 9?" are one question, and so are two sort
or max questions over the same numbers. Every pair is checked against the independent rule in
`rpo_fast.gold` (chosen scores 1.0, rejected 0.0) before anything is written.

Deterministic: one `random.Random(SEED)`, fixed per-task counts, rows written with `json.dumps` in a
fixed key order, "\\n" line ends, UTF-8.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA_DIR.parent))  # run as a script from a checkout: import rpo_fast from it

from rpo_fast.gold import UNIT_FACTORS, gold_reward, solve  # noqa: E402

SEED = 2405_16436  # the RPO paper's arXiv id
PAIRS_PER_TASK = 50
EVAL_PER_TASK = 10  # 80/20 split within every task: 280 train, 70 eval pairs
FILES = ("train.jsonl", "eval.jsonl")

# Words for the letter-counting task: many repeated letters.
WORDS = (
    "strawberry banana mississippi bookkeeper committee balloon letter coffee apple pepper engineer "
    "cheese butterfly assessment parallel umbrella possession address tomorrow success giraffe "
    "hippopotamus elephant raccoon sheep puppy grammar pineapple essence referee abracadabra necessary "
    "occurrence millennium broccoli spaghetti dictionary excellent attention programming kangaroo carrot "
    "mirror little bottle kitten summer yellow happiness llama paper window cinnamon coconut alphabet "
    "calendar accommodate embarrass tattoo foggy pizza cocoa bubble teeth narrative independence"
).split()

# Plausible wrong conversion factors for each true factor.
WRONG_FACTORS = {100: (10, 1000), 1000: (100, 10), 60: (100, 24), 24: (60, 12), 7: (5, 10), 12: (10, 3),
                 3: (12, 10)}


def _add(rng: random.Random):
    if rng.random() < 0.7:
        a, b = rng.randint(12, 98), rng.randint(12, 98)
    else:
        a, b = rng.randint(100, 499), rng.randint(10, 99)
    right = a + b
    error = rng.choice(("off_by_one", "carry_error", "wrong_operation"))
    if error == "off_by_one":
        wrong = right + rng.choice((-1, 1))
    elif error == "carry_error":  # a dropped carry, or one added where there was none
        wrong = right - 10 if a % 10 + b % 10 >= 10 else right + 10
    else:
        wrong = abs(a - b)
    return f"What is {a} + {b}?", right, wrong, error


def _sub(rng: random.Random):
    a = rng.randint(30, 99) if rng.random() < 0.7 else rng.randint(100, 999)
    b = rng.randint(11, a - 1)
    right = a - b
    error = rng.choice(("off_by_one", "borrow_error", "wrong_operation"))
    if error == "off_by_one":
        wrong = right + rng.choice((-1, 1))
    elif error == "borrow_error":  # a forgotten borrow, or one taken where none was needed
        wrong = right + 10 if a % 10 < b % 10 else (right - 10 if right > 10 else right + 10)
    else:
        wrong = a + b
    return f"What is {a} - {b}?", right, wrong, error


def _mul(rng: random.Random):
    if rng.random() < 0.7:
        a, b = rng.randint(2, 12), rng.randint(3, 12)
    else:
        a, b = rng.randint(11, 25), rng.randint(3, 9)
    right = a * b
    error = rng.choice(("off_by_one_group", "wrong_operation", "off_by_one"))
    if error == "off_by_one_group":  # one group of `a` too many or too few
        wrong = right + rng.choice((-a, a))
    elif error == "wrong_operation":
        wrong = a + b
    else:
        wrong = right + rng.choice((-1, 1))
    return f"What is {a} times {b}?", right, wrong, error


def _convert(rng: random.Random):
    big, small = rng.choice(sorted(UNIT_FACTORS))
    factor = UNIT_FACTORS[(big, small)]
    n = rng.randint(2, 12)
    right = n * factor
    error = rng.choice(("wrong_factor", "off_by_one_unit"))
    if error == "wrong_factor":
        wrong = n * rng.choice(WRONG_FACTORS[factor])
    else:
        wrong = (n + rng.choice((-1, 1))) * factor
    return f"How many {small} are in {n} {big}?", right, wrong, error


def _distinct_numbers(rng: random.Random, k: int) -> list[int]:
    numbers = rng.sample(range(1, 100), k)
    while numbers == sorted(numbers):
        rng.shuffle(numbers)
    return numbers


def _sort(rng: random.Random):
    numbers = _distinct_numbers(rng, rng.randint(4, 6))
    right = sorted(numbers)
    error = rng.choice(("reversed", "adjacent_swap"))
    if error == "reversed":
        wrong = right[::-1]
    else:
        i = rng.randrange(len(right) - 1)
        wrong = right[:i] + [right[i + 1], right[i]] + right[i + 2:]
    listed = ", ".join(map(str, numbers))
    return (f"Sort these numbers from smallest to largest: {listed}.", ", ".join(map(str, right)),
            ", ".join(map(str, wrong)), error)


def _max(rng: random.Random):
    numbers = _distinct_numbers(rng, rng.randint(4, 5))
    right = max(numbers)
    error = rng.choice(("second_largest", "smallest"))
    wrong = sorted(numbers)[-2] if error == "second_largest" else min(numbers)
    return f"Which number is the largest: {', '.join(map(str, numbers))}?", right, wrong, error


def _count(rng: random.Random):
    word = rng.choice(WORDS)
    repeated = sorted({c for c in word if word.count(c) >= 2})
    letter = rng.choice(repeated) if repeated and rng.random() < 0.75 else rng.choice(sorted(set(word)))
    right = word.count(letter)
    wrong = right - 1 if right > 1 and rng.random() < 0.5 else right + 1
    return f'How many times does the letter "{letter}" appear in the word "{word}"?', right, wrong, "off_by_one"


TASK_MAKERS = {"add": _add, "sub": _sub, "mul": _mul, "convert": _convert, "sort": _sort, "max": _max,
               "count": _count}


# Tasks whose question asks the same thing whatever the order of its numbers (a + b, a times b, sort, max).
ORDER_FREE_TASKS = ("add", "mul", "sort", "max")


def canonical_key(task: str, question: str) -> tuple:
    """What makes a question the same as another: (task, its numbers sorted) for ORDER_FREE_TASKS, else
    (task, the question text) (sub, convert and count change meaning with any other wording)."""
    if task in ORDER_FREE_TASKS:
        return task, tuple(sorted(int(n) for n in re.findall(r"\d+", question)))
    return task, question


def _row(task: str, question: str, right, wrong, error: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": f"The answer is {right}."}],
        "rejected": [{"role": "assistant", "content": f"The answer is {wrong}."}],
        "task": task,
        "error": error,
    }


def build_splits(seed: int = SEED) -> dict[str, list[dict]]:
    """{"train.jsonl": rows, "eval.jsonl": rows}: PAIRS_PER_TASK questions per task, no two with the same
    `canonical_key` (so none twice within or across the splits), the last EVAL_PER_TASK of each task to eval,
    each split shuffled."""
    rng = random.Random(seed)
    seen: set[tuple] = set()
    train, held_out = [], []
    for task, make in TASK_MAKERS.items():
        rows = []
        while len(rows) < PAIRS_PER_TASK:
            question, right, wrong, error = make(rng)
            key = canonical_key(task, question)
            if key in seen or str(right) == str(wrong):
                continue
            seen.add(key)
            row = _row(task, question, right, wrong, error)
            # Cross-check against the independent rule before anything is written.
            assert solve(question)[0] == task, (question, solve(question))
            assert gold_reward(row, row["chosen"][0]["content"]) == 1.0, row
            assert gold_reward(row, row["rejected"][0]["content"]) == 0.0, row
            rows.append(row)
        train += rows[:-EVAL_PER_TASK]
        held_out += rows[-EVAL_PER_TASK:]
    rng.shuffle(train)
    rng.shuffle(held_out)
    return {"train.jsonl": train, "eval.jsonl": held_out}


def render(seed: int = SEED) -> dict[str, str]:
    """The exact text of every output file, keyed by file name."""
    return {name: "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            for name, rows in build_splits(seed).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output folder (default: next to this script)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="compare with the files in --out, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render(args.seed).items():
        path = args.out / name
        data = text.encode("utf-8")
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                stale.append(str(path))
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            print(f"wrote {path} ({text.count(chr(10))} rows)")
    if stale:
        print(f"out of date (rerun python data/generate.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
