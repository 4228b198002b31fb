"""Deterministic generator for kiln's post-training demo datasets, derived from the recipe data.

    python examples/data/make_post_training.py           # (re)write the four files below
    python examples/data/make_post_training.py --check   # exit 1 unless the files on disk match

Standard library only (``json``, ``random``, ``argparse``): every row draws from its own
``random.Random(f"kiln-post-training-{dataset}-{id}")``, so the same recipe files always give
byte-identical outputs. Only the well-formed recipes (``quality_score >= 0.65``, see
``make_recipes.py``) are used; ``recipes.jsonl`` gives the train files and ``recipes_val.jsonl``
the ``_val`` ones. Each JSONL line is one JSON object with the keys, in this order:

* ``recipes_chat.jsonl`` / ``recipes_chat_val.jsonl`` (chat fine-tuning): ``id`` (the recipe's)
  and ``messages``, a list of ``{"role", "content"}`` with roles system/user/assistant. About one
  conversation in ten has no system message; then a user asks for the recipe and the assistant
  answers with it::

      Ingredients:
      - 2 cups basmati rice
      - ...

      Steps:
      1. Rinse the rice until the water runs clear.
      2. ...

      Tip: Toast the rice in the butter first for a nuttier flavor.

  (one ``Tip:`` line per tip, none when the recipe has no tips). About one conversation in three
  goes on with a follow-up question whose answer comes from the recipe exactly (the ingredient
  list, the number of steps or ingredients, the first or the last step).
* ``recipes_preference.jsonl`` / ``recipes_preference_val.jsonl`` (preference optimization, e.g.
  DPO): ``id``, ``prompt`` (the user request), ``chosen`` (the recipe answer above) and
  ``rejected``: the same answer with one corruption (steps shuffled, an ingredient dropped, the
  last half of the steps cut off, an ingredient line duplicated, or steps numbered wrongly). The
  row does not say which corruption was used; ``rejected`` always differs from ``chosen``.

Each output file is capped at ``MAX_BYTES`` (6 MB): rows that would take it past that are left
out. The 3000 shipped recipes stay well under the cap, so every well-formed recipe is used.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # importable from anywhere, not only as a script
    sys.path.insert(0, str(HERE))
from make_recipes import write_or_check  # noqa: E402  (the same --check as the recipes)

SOURCES = {"": "recipes.jsonl", "_val": "recipes_val.jsonl"}  # output suffix: recipe file
WELL_FORMED = 0.65  # make_recipes.py scores flawed rows <= 0.6, well-formed ones >= 0.72
MAX_BYTES = 6_000_000
MULTI_TURN_RATE, NO_SYSTEM_RATE = 1 / 3, 0.1

SYSTEM_PROMPTS = (
    "You are a helpful cooking assistant. You write clear, complete recipes.",
    "You are a friendly chef. You write clear, complete recipes that are easy to follow.",
    "You are a cooking assistant. Give the ingredients first, then numbered steps.",
)
REQUESTS = (
    "Write a recipe for {title} for {servings} people.",
    "How do I make {title}? It should serve {servings}.",
    "Can you give me a recipe for {title} that serves {servings}?",
    "I want to cook {title} for {servings} people. What is the recipe?",
)
# Follow-up question and its answer, computed from the recipe row. Well-formed recipes have at
# least 4 ingredients and 3 steps, so the plurals always fit.
FOLLOW_UPS = (
    ("Which ingredients do I need?", lambda row: ingredient_lines(row["ingredients"])),
    ("How many steps are there?", lambda row: f"There are {len(row['steps'])} steps."),
    (
        "How many ingredients does it use?",
        lambda row: f"It uses {len(row['ingredients'])} ingredients.",
    ),
    ("What is the first step?", lambda row: row["steps"][0]),
    ("What is the last step?", lambda row: row["steps"][-1]),
)


def ingredient_lines(ingredients):
    return "\n".join(f"- {x}" for x in ingredients)


def recipe_answer(ingredients, steps, tips, numbers=None):
    """The assistant's recipe text; ``numbers`` overrides the step numbers 1, 2, 3, ..."""
    numbers = numbers or range(1, len(steps) + 1)
    text = f"Ingredients:\n{ingredient_lines(ingredients)}\n\nSteps:\n"
    text += "\n".join(f"{n}. {s}" for n, s in zip(numbers, steps, strict=True))
    if tips:
        text += "\n\n" + "\n".join(f"Tip: {t}" for t in tips)
    return text


def request(rng, row):
    return rng.choice(REQUESTS).format(title=row["title"], servings=row["servings"])


def chat_row(row):
    """One conversation asking for the recipe, sometimes with a follow-up question."""
    rng = random.Random(f"kiln-post-training-chat-{row['id']}")
    messages = []
    if rng.random() >= NO_SYSTEM_RATE:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages.append({"role": "user", "content": request(rng, row)})
    answer = recipe_answer(row["ingredients"], row["steps"], row["tips"])
    messages.append({"role": "assistant", "content": answer})
    if rng.random() < MULTI_TURN_RATE:
        question, reply = rng.choice(FOLLOW_UPS)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": reply(row)})
    return {"id": row["id"], "messages": messages}


def corrupt(rng, ingredients, steps, tips):
    """The recipe answer with one corruption, drawn among those the recipe allows."""
    ings, steps = list(ingredients), list(steps)
    kinds = ["duplicated_ingredient"]
    if len(ings) >= 2:
        kinds.append("dropped_ingredient")
    if len(steps) >= 2:
        kinds += ["truncated_steps", "misnumbered_steps"]
    if len(set(steps)) >= 2:  # a shuffle can then change the order
        kinds.append("shuffled_steps")
    kind = rng.choice(kinds)
    numbers = None
    if kind == "duplicated_ingredient":
        i = rng.randrange(len(ings))
        ings.insert(i + 1, ings[i])
    elif kind == "dropped_ingredient":
        del ings[rng.randrange(len(ings))]
    elif kind == "truncated_steps":
        steps = steps[: len(steps) // 2]
    elif kind == "misnumbered_steps":  # e.g. 1, 2, 2, 4: one step repeats the previous number
        numbers = list(range(1, len(steps) + 1))
        i = rng.randrange(1, len(steps))
        numbers[i] = numbers[i - 1]
    else:
        original = list(steps)
        while steps == original:
            rng.shuffle(steps)
    return recipe_answer(ings, steps, tips, numbers)


def preference_row(row):
    """The recipe request with the well-formed answer as chosen and a corrupted one rejected."""
    rng = random.Random(f"kiln-post-training-preference-{row['id']}")
    prompt = request(rng, row)
    chosen = recipe_answer(row["ingredients"], row["steps"], row["tips"])
    rejected = corrupt(rng, row["ingredients"], row["steps"], row["tips"])
    assert rejected != chosen, row["id"]
    return {"id": row["id"], "prompt": prompt, "chosen": chosen, "rejected": rejected}


def dump(rows):
    """JSONL bytes, one object a line, stopping before the row that would pass MAX_BYTES."""
    lines, size = [], 0
    for row in rows:
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        if size + len(line) > MAX_BYTES:
            break
        lines.append(line)
        size += len(line)
    return b"".join(lines)


def build_files(data_dir=HERE):
    """File name -> bytes of the four output files, from the recipe files in data_dir."""
    files = {}
    for suffix, source in SOURCES.items():
        with (Path(data_dir) / source).open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        good = [r for r in rows if r["quality_score"] >= WELL_FORMED]
        files[f"recipes_chat{suffix}.jsonl"] = dump(chat_row(r) for r in good)
        files[f"recipes_preference{suffix}.jsonl"] = dump(preference_row(r) for r in good)
    return files


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate kiln's post-training demo datasets.")
    ap.add_argument("--data-dir", type=Path, default=HERE, help="where the recipe files are")
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ap.add_argument("--check", action="store_true", help="verify the files; exit 1 on mismatch")
    args = ap.parse_args(argv)
    return write_or_check(build_files(args.data_dir), args.out_dir, args.check)


if __name__ == "__main__":
    sys.exit(main())
