"""The embedded task: rewrite the date mentioned in a sentence as ISO 8601 (YYYY-MM-DD).

One exact answer per example, generated deterministically from a seed, with a held-out
split. The base SmolLM2-135M-Instruct rarely gets the exact format right; a few minutes of
LoRA on two CPU cores teach it.
"""

from __future__ import annotations

import json
import os
import random

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS_IN = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
TEMPLATES = [
    "The meeting was moved to {date}.",
    "She was born on {date} in a small town.",
    "Our flight leaves on {date}, early in the morning.",
    "The invoice is due {date}.",
    "They signed the contract on {date}.",
    "The concert takes place on {date} at the park.",
    "He started his new job on {date}.",
    "The library reopens {date} after repairs.",
]
INSTRUCTION = "Write the date in this sentence as YYYY-MM-DD. Answer with the date only.\n"


def _date_text(rng: random.Random, year: int, month: int, day: int) -> str:
    name = MONTHS[month - 1]
    style = rng.randrange(4)
    if style == 0:
        return f"{name} {day}, {year}"
    if style == 1:
        return f"{day} {name} {year}"
    if style == 2:
        return f"{name[:3]} {day}, {year}"
    return f"the {day}{_suffix(day)} of {name} {year}"


def _suffix(day: int) -> str:
    if 10 <= day % 100 <= 20:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def example(rng: random.Random) -> dict:
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, DAYS_IN[month - 1] if month != 2 else 28)
    sentence = rng.choice(TEMPLATES).format(date=_date_text(rng, year, month, day))
    return {"messages": [{"role": "user", "content": INSTRUCTION + sentence},
                         {"role": "assistant", "content": f"{year:04d}-{month:02d}-{day:02d}"}]}


def make(n_train: int = 2000, n_test: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out examples (no held-out sentence appears in training)."""
    rng = random.Random(seed)
    seen: set[str] = set()

    def fresh(n: int) -> list[dict]:
        out = []
        while len(out) < n:
            ex = example(rng)
            if ex["messages"][0]["content"] not in seen:
                seen.add(ex["messages"][0]["content"])
                out.append(ex)
        return out

    test = fresh(n_test)  # drawn first, so the held-out set does not depend on n_train
    return fresh(n_train), test


def write(out_dir: str, n_train: int = 2000, n_test: int = 100, seed: int = 0) -> tuple[str, str]:
    """Write train.jsonl and test.jsonl; returns their paths."""
    train, test = make(n_train, n_test, seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, rows in (("train", train), ("test", test)):
        path = os.path.join(out_dir, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        paths.append(path)
    return paths[0], paths[1]


if __name__ == "__main__":
    import sys

    print(*write(sys.argv[1] if len(sys.argv) > 1 else "dates"), sep="\n")
