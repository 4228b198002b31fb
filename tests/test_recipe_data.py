"""Checks on the bundled demo recipe dataset and its generator (examples/data/make_recipes.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
SCRIPT = DATA / "make_recipes.py"
TRAIN, VAL = DATA / "recipes.jsonl", DATA / "recipes_val.jsonl"
KEYS = [
    "id",
    "title",
    "servings",
    "ingredients",
    "steps",
    "tips",
    "cuisine",
    "quality_score",
    "difficulty",
    "text",
]
FLAWED_BELOW = 0.65  # well-formed rows score >= 0.72, flawed ones <= 0.6
GOOD_LAYOUT = re.compile(
    r"Title: [^\n]+\nServings: \d+\n\n"
    r"Ingredients:\n(?:- [^\n]+\n)+\n"
    r"Steps:\n(?:\d+\. [^\n]+\n)*\d+\. [^\n]+"
    r"(?:\n\n(?:Tip: [^\n]+\n)*Tip: [^\n]+)?"
)


def run_generator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


def load(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return load(TRAIN)


@pytest.fixture(scope="module")
def val() -> list[dict]:
    return load(VAL)


def render(row: dict) -> str:
    """The layout of a well-formed recipe, rebuilt from the structured fields."""
    text = f"Title: {row['title']}\nServings: {row['servings']}\n\nIngredients:\n"
    text += "\n".join(f"- {x}" for x in row["ingredients"]) + "\n\nSteps:\n"
    text += "\n".join(f"{i}. {s}" for i, s in enumerate(row["steps"], 1))
    if row["tips"]:
        text += "\n\n" + "\n".join(f"Tip: {t}" for t in row["tips"])
    return text


def test_generator_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        proc = run_generator("--out-dir", str(out), "--n-train", "150", "--n-val", "40")
        assert proc.returncode == 0, proc.stderr
    for name in ("recipes.jsonl", "recipes_val.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert len(load(a / "recipes.jsonl")) == 150
    assert len(load(a / "recipes_val.jsonl")) == 40

    small = ("--out-dir", str(a), "--n-train", "150", "--n-val", "40")
    assert run_generator(*small, "--check").returncode == 0
    other_seed = run_generator(*small, "--seed", "1", "--check")
    assert other_seed.returncode == 1
    with (a / "recipes_val.jsonl").open("a", encoding="utf-8") as f:
        f.write("\n")
    assert run_generator(*small, "--check").returncode == 1


def test_shipped_files_match_generator():
    proc = run_generator("--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_row_counts_and_size(train, val):
    assert len(train) == 3000
    assert len(val) == 300
    assert TRAIN.stat().st_size < 6_000_000
    assert len({r["id"] for r in train + val}) == len(train) + len(val)


@pytest.mark.parametrize("split", ["train", "val"])
def test_schema(split, request):
    rows = request.getfixturevalue(split)
    prefix = "r" if split == "train" else "v"
    for row in rows:
        assert list(row) == KEYS
        assert re.fullmatch(prefix + r"\d{5}", row["id"])
        assert isinstance(row["title"], str)
        assert row["title"]
        assert type(row["servings"]) is int
        assert row["servings"] > 0
        for key in ("ingredients", "steps", "tips"):
            assert isinstance(row[key], list)
            assert all(isinstance(x, str) and x for x in row[key])
        assert isinstance(row["cuisine"], str)
        assert row["cuisine"]
        assert isinstance(row["quality_score"], float)
        assert 0.0 <= row["quality_score"] <= 1.0
        assert round(row["quality_score"], 3) == row["quality_score"]
        assert type(row["difficulty"]) is int
        assert 1 <= row["difficulty"] <= 5
        text = row["text"]
        assert isinstance(text, str)
        assert not text.endswith("\n")
        assert all(line == line.rstrip() for line in text.split("\n"))
        # structured fields reflect the text, flawed rows included
        lines = text.split("\n")
        assert lines[0] == f"Title: {row['title']}"
        assert all(f"- {x}" in lines for x in row["ingredients"])
        assert all(s in text for s in row["steps"])
        assert all(f"Tip: {t}" in lines for t in row["tips"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_good_rows_follow_layout(split, request):
    good = [r for r in request.getfixturevalue(split) if r["quality_score"] >= FLAWED_BELOW]
    assert good
    for row in good:
        assert GOOD_LAYOUT.fullmatch(row["text"]), row["text"]
        assert row["text"] == render(row)
        assert 4 <= len(row["ingredients"]) <= 12
        assert 3 <= len(row["steps"]) <= 10
        assert len(set(row["steps"])) == len(row["steps"])
        for step in row["steps"]:
            assert re.fullmatch(r"[A-Z][a-z-]+ .+\.", step), step
        assert all(re.match(r"\d", x) for x in row["ingredients"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_flawed_fraction(split, request):
    rows = request.getfixturevalue(split)
    flawed = sum(r["quality_score"] < FLAWED_BELOW for r in rows) / len(rows)
    assert 0.10 <= flawed <= 0.30
    assert all(r["quality_score"] <= 0.6 for r in rows if r["quality_score"] < FLAWED_BELOW)


def test_duplicates_are_deliberate_and_rare(train):
    texts = [r["text"] for r in train]
    n_dup = len(texts) - len(set(texts))
    assert 1 <= n_dup <= 0.02 * len(texts)


def test_train_and_val_share_no_text(train, val):
    assert not {r["text"] for r in train} & {r["text"] for r in val}
