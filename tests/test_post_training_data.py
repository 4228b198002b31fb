"""Checks on the chat and preference demo datasets and their generator
(examples/data/make_post_training.py), which derives them from the recipe demo data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
SCRIPT = DATA / "make_post_training.py"
SPLITS = {"train": ("recipes.jsonl", ""), "val": ("recipes_val.jsonl", "_val")}
OUTPUTS = [
    f"recipes_{kind}{suffix}.jsonl"
    for _, suffix in SPLITS.values()
    for kind in ("chat", "preference")
]
WELL_FORMED = 0.65
ROLES = {"system", "user", "assistant"}


def load(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def recipe_answer(row: dict) -> str:
    """The recipe answer, rebuilt here from the row's fields rather than by the generator."""
    text = "Ingredients:\n" + "\n".join(f"- {x}" for x in row["ingredients"]) + "\n\nSteps:\n"
    text += "\n".join(f"{i}. {s}" for i, s in enumerate(row["steps"], 1))
    if row["tips"]:
        text += "\n\n" + "\n".join(f"Tip: {t}" for t in row["tips"])
    return text


def follow_up_answers(row: dict) -> set[str]:
    """Every answer a follow-up question may get: each is read off the recipe exactly."""
    return {
        "\n".join(f"- {x}" for x in row["ingredients"]),
        f"There are {len(row['steps'])} steps.",
        f"It uses {len(row['ingredients'])} ingredients.",
        row["steps"][0],
        row["steps"][-1],
    }


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("make_post_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sources() -> dict[str, dict[str, dict]]:
    """Split -> id -> well-formed recipe row."""
    return {
        split: {r["id"]: r for r in load(DATA / name) if r["quality_score"] >= WELL_FORMED}
        for split, (name, _) in SPLITS.items()
    }


def test_shipped_files_match_generator(gen):
    files = gen.build_files(DATA)
    assert sorted(files) == sorted(OUTPUTS)
    for name, data in files.items():
        assert (DATA / name).read_bytes() == data, f"{name} is stale: rerun {SCRIPT.name}"


@pytest.mark.parametrize("split", list(SPLITS))
def test_every_well_formed_recipe_is_used(split, sources):
    suffix = SPLITS[split][1]
    for kind in ("chat", "preference"):
        path = DATA / f"recipes_{kind}{suffix}.jsonl"
        assert path.stat().st_size < 6_000_000
        assert [r["id"] for r in load(path)] == list(sources[split])


@pytest.mark.parametrize("split", list(SPLITS))
def test_chat_rows(split, sources):
    rows = load(DATA / f"recipes_chat{SPLITS[split][1]}.jsonl")
    multi_turn = no_system = 0
    for row in rows:
        assert list(row) == ["id", "messages"]
        messages = row["messages"]
        assert all(list(m) == ["role", "content"] for m in messages)
        roles = [m["role"] for m in messages]
        assert set(roles) <= ROLES
        assert "system" not in roles[1:]
        assert roles.count("user") >= 1
        assert roles[-1] == "assistant"
        for m in messages:
            assert isinstance(m["content"], str)
            assert m["content"]
            assert m["content"] == m["content"].strip()
        dialog = messages[1:] if roles[0] == "system" else messages
        assert [m["role"] for m in dialog] == ["user", "assistant"] * (len(dialog) // 2)
        source = sources[split][row["id"]]
        assert source["title"] in dialog[0]["content"]
        assert dialog[1]["content"] == recipe_answer(source)
        if len(dialog) > 2:
            assert len(dialog) == 4
            assert dialog[3]["content"] in follow_up_answers(source)
            multi_turn += 1
        no_system += roles[0] != "system"
    assert 0.20 <= multi_turn / len(rows) <= 0.45
    assert 0.05 <= no_system / len(rows) <= 0.20


@pytest.mark.parametrize("split", list(SPLITS))
def test_preference_rows(split, sources):
    rows = load(DATA / f"recipes_preference{SPLITS[split][1]}.jsonl")
    for row in rows:
        assert list(row) == ["id", "prompt", "chosen", "rejected"]
        source = sources[split][row["id"]]
        assert row["prompt"]
        assert row["prompt"] == row["prompt"].strip()
        assert source["title"] in row["prompt"]
        assert row["chosen"] == recipe_answer(source)
        assert row["rejected"]
        assert row["rejected"] != row["chosen"]


def test_check_mode_flags_a_tampered_file(gen, tmp_path, capsys):
    assert gen.main(["--out-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(OUTPUTS)
    assert gen.main(["--out-dir", str(tmp_path), "--check"]) == 0
    tampered = tmp_path / "recipes_preference_val.jsonl"
    tampered.write_bytes(tampered.read_bytes().replace(b"1. ", b"1) ", 1))
    capsys.readouterr()
    assert gen.main(["--out-dir", str(tmp_path), "--check"]) == 1
    assert tampered.name in capsys.readouterr().out
