"""Fuzz: hostile `sweep:` sections never get a traceback, only one line per problem (issue 26).

A seeded generator (every failure names its case number and what was fed) mutates a valid
sweep file the way hostile or careless input does: wild values (nan, inf, huge numbers, wrong
types), unknown keys, deleted keys, deep nesting, non-ASCII and odd space keys, huge lists,
grids too large to list. Each case runs `kiln sweep FILE` in-process with the controller
stood in by one candidate asked and checked (no trial process, no torch): exit 0 or 2, no
traceback, every stderr line a `kiln:` line. A few cases also go through the real command
line in a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT, make_rows, write_jsonl

from kiln.cli import main

pytest.importorskip("optuna")

SEED = 26
CASES = 120

_WILD: list[Any] = [
    float("inf"),
    float("-inf"),
    float("nan"),
    -1,
    0,
    10**30,
    2**53 + 1,
    True,
    False,
    None,
    "",
    "two",
    "名前🍲",
    "\x00",
    "val_losss",
    [],
    {},
    [1, "a", None],
    {"a": {"b": {"c": 1}}},
    {"low": 1, "high": 0},
    {"low": "a", "high": "b", "log": "yes"},
    "1e-3",
    1e308,
    -1e308,
    -0.0,
    1e-320,
]
_SPACE_KEYS = [
    "optim.lr",
    "名前.キー",
    "",
    "optim",
    "optim.lr\nx",
    "a" * 5000,
    "train..batch",
    "optim.lr ",
    "sweep.space",
    "__class__",
]


def _base(tmp: Path, data: Path) -> dict[str, Any]:
    return {
        "name": "fuzz",
        "output_dir": str(tmp / "run"),
        "model": {
            "arch": "gpt2",
            "hidden_size": 16,
            "num_layers": 1,
            "num_heads": 2,
            "max_position_embeddings": 32,
        },
        "tokenizer": {"vocab_size": 280},
        "data": {"train": str(data), "max_length": 16, "cache_dir": None, "val_split": 0.1},
        "train": {"max_steps": 1, "batch_size": 2},
        "log": {"every_steps": 1, "progress": "none", "plots": False},
        "sweep": {
            "method": "random",
            "trials": 2,
            "metric": "val_loss",
            "mode": "min",
            "seed": 0,
            "plots": False,
            "pruner": {"type": "median", "warmup_evals": 1},
            "space": {
                "optim.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                "train.batch_size": [2, 4],
                "optim.weight_decay": {"low": 0.0, "high": 0.1, "step": 0.01},
            },
        },
    }


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict) and node:
        return [p for k, v in node.items() for p in _leaves(v, (*path, k))] + [path]
    return [path]


def _at(raw: dict[str, Any], path: tuple[Any, ...]) -> Any:
    for key in path:
        raw = raw[key]
    return raw


def _mutate(rng: random.Random, sweep: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """One to three hostile edits of a sweep section; a description and the new section."""
    sweep = json.loads(json.dumps(sweep))
    what = []
    for _ in range(rng.randint(1, 3)):
        path = rng.choice([p for p in _leaves(sweep) if p])
        name = ".".join(map(str, path))
        parent, leaf = _at(sweep, path[:-1]), path[-1]
        roll = rng.random()
        if not isinstance(parent, dict):
            continue
        space = sweep.get("space")
        ranges = (
            [k for k, v in space.items() if isinstance(v, dict)] if isinstance(space, dict) else []
        )
        if roll < 0.25 and ranges:
            key, field = rng.choice(ranges), rng.choice(["low", "high", "step", "log"])
            value = rng.choice([*_WILD, -0.001, 1e-9, 5.0, "yes", 1])
            sweep["space"][key][field] = value
            what.append(f"space.{key}.{field}={value!r}"[:80])
        elif roll < 0.5:
            parent[leaf] = rng.choice(_WILD)
            what.append(f"{name}={parent[leaf]!r}"[:80])
        elif roll < 0.58:
            parent[f"{leaf}_typo"] = rng.choice(_WILD)
            what.append(f"unknown key near {name}")
        elif roll < 0.64:
            parent.pop(leaf)
            what.append(f"del {name}")
        elif roll < 0.7:
            deep: Any = 1
            for _ in range(rng.choice([20, 60, 200])):
                deep = [deep] if rng.random() < 0.5 else {"k": deep}
            parent[leaf] = deep
            what.append(f"{name}=nested")
        elif roll < 0.78 and isinstance(sweep.get("space"), dict):
            key = rng.choice(_SPACE_KEYS)
            sweep["space"][key] = rng.choice([[1, 2], {"low": 0.1, "high": 0.2}, rng.choice(_WILD)])
            what.append(f"space key {key[:20]!r}")
        elif roll < 0.85 and isinstance(sweep.get("space"), dict):
            n = rng.choice([10_001, 300, 40, 40, 40, 40])  # YAML of 10k values reads slowly
            values = [rng.choice([rng.random(), rng.randint(0, 9), "x"]) for _ in range(n)]
            sweep["space"][rng.choice(["optim.lr", "train.batch_size"])] = values
            what.append(f"a list of {n} values")
        elif roll < 0.92:
            sweep["method"] = rng.choice(["grid", "cmaes", "gp", "GRID", "tpe "])
            if rng.random() < 0.5 and isinstance(sweep.get("space"), dict):
                axis = [round(rng.random(), 6) for _ in range(rng.choice([2, 400, 600]))]
                sweep["space"] = {"optim.lr": axis, "optim.weight_decay": list(axis)}
            what.append(f"method {sweep['method']!r}")
        else:
            sweep["metric"] = rng.choice(["val_losss", "", "名前", "val_bleu", "loss", "val_ppl"])
            sweep["mode"] = rng.choice(["min", "max", "MAX", None])
            what.append(f"metric {sweep['metric']!r}, mode {sweep['mode']!r}")
    return "; ".join(what) or "unchanged", sweep


def _case(rng: random.Random, tmp: Path, data: Path) -> tuple[str, bytes, list[str]]:
    """One sweep file's bytes and the overrides given with it."""
    raw = _base(tmp, data)
    overrides: list[str] = []
    roll = rng.random()
    if roll < 0.12:  # odd but valid: these reach the controller
        raw["sweep"].update(
            method=rng.choice(["grid", "random", "tpe", "gp", "cmaes"]),
            seed=rng.choice([0, 2**32 - 1, 7]),
            trials=rng.randint(1, 50),
            timeout_s=rng.choice([None, 1e-3, 1e6]),
            mode="max",
            metric=rng.choice(["val_ppl", "val_accuracy", "val_tokens"]),
        )
        lrs = [rng.random() / 100 for _ in range(3)]
        raw["sweep"]["space"] = {"optim.lr": lrs, "model.dropout": [0.0, None, 0.5]}
        what = f"valid {raw['sweep']['method']}"
    elif roll < 0.85:
        what, raw["sweep"] = _mutate(rng, raw["sweep"])
    elif roll < 0.92:
        raw["sweep"] = rng.choice([[1, 2], "sweep", None, 3, {}, {"space": {}}])
        what = f"sweep: {raw['sweep']!r}"
    else:
        key = rng.choice(
            [
                "sweep.trials",
                "sweep.space.optim.lr.step",
                "sweep.seed",
                "sweep.timeout_s",
                "sweep.nope",
                "sweep.space.名前",
            ]
        )
        value = rng.choice(["-1", "nan", ".inf", "1e400", "[]", "{}", "x", "2", "名前"])
        overrides = [f"{key}={value}"]
        what = f"override {overrides[0]}"
    try:
        text = yaml.safe_dump(raw, allow_unicode=True)
    except (yaml.YAMLError, RecursionError):
        text = json.dumps(raw)  # JSON is YAML
    return what, text.encode(), overrides


@pytest.fixture
def one_candidate(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The controller asks one candidate and checks its config, as its first trial would,
    then stops (no trial process); returns a counter of candidates checked."""
    from kiln.config import ConfigError
    from kiln.sweep.controller import Controller

    asked = [0]

    def run(self: Controller) -> dict[str, Any]:
        t = self._next()
        if t is not None:
            asked[0] += 1
            # A bad candidate fails its trial (one line in trials.csv), not the sweep.
            with contextlib.suppress(ConfigError):
                self.sweep.check(t.params)
        return {"paused": None}

    monkeypatch.setattr(Controller, "run", run)
    return asked


@pytest.mark.slow  # about 120 sweep files through `kiln sweep` in-process (YAML reading dominates)
def test_fuzzed_sweep_sections_never_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_candidate: list[int]
) -> None:
    rng = random.Random(SEED)
    data = write_jsonl(tmp_path / "train.jsonl", make_rows(20, seed=3))
    failures: list[str] = []
    codes: Counter[int] = Counter()
    for i in range(CASES):
        what, body, overrides = _case(rng, tmp_path / f"c{i}", data)
        path = tmp_path / f"sweep-{i}.yaml"
        path.write_bytes(body)
        label = f"case {i} ({what})"
        try:
            code = main(["-q", "sweep", str(path), *overrides])
        except BaseException as exc:  # anything escaping main() would be a traceback
            failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        err = capsys.readouterr().err
        bad = [x for x in err.splitlines() if x.strip() and not x.startswith("kiln:")]
        if code not in (0, 2) or "Traceback" in err or bad:
            failures.append(f"{label}: exit {code}, stderr {err[-300:]!r}")
        codes[code] += 1
    assert failures == [], f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures[:20])
    # Mostly bad input, which reached the checks; and some odd but valid, which ran.
    assert codes[2] >= CASES // 2
    assert codes[0] >= 10
    assert one_candidate[0] == codes[0]


@pytest.mark.slow
def test_fuzzed_sweep_files_through_the_real_command_line(tmp_path: Path) -> None:
    """A few hostile files through `kiln sweep` in a subprocess: one kiln line, exit 2."""
    data = write_jsonl(tmp_path / "train.jsonl", make_rows(20, seed=3))
    raw = _base(tmp_path, data)
    cases = {
        "nan": {**raw["sweep"], "space": {"optim.lr": {"low": float("nan"), "high": 1.0}}},
        "deep": {**raw["sweep"], "space": {"optim.lr": json.loads("[" * 60 + "]" * 60)}},
        "key": {**raw["sweep"], "space": {"名前\nx": [1, 2]}},
    }
    for name, sweep in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({**raw, "sweep": sweep}))
        done = subprocess.run(
            [sys.executable, "-m", "kiln.cli", "sweep", str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, (name, done.stderr[-2000:])
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, (name, lines)
        assert lines[0].startswith(f"kiln: error: {path}: sweep."), (name, lines)
    assert not (tmp_path / "run").exists()
