"""Fuzz: random and mutated YAML and JSONL never get a traceback, only one line per problem.

A seeded generator (reproducible: every failure names its case number and what was fed) mutates a
valid config and valid data in the ways hostile or careless input does: random bytes, deep
nesting, huge numbers, inf/nan, wrong types, unicode, YAML aliases, truncation. Each case goes
through the real command line in-process (`kiln config validate`, `kiln data preview`, and for a
share of them `kiln train` for one step) and must end with exit code 0 or 2, no traceback, and
every line on stderr a `kiln:` line (an error names one problem each).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import make_rows

from kiln.cli import main

SEED = 11
CONFIG_CASES = 220
DATA_CASES = 110
TRAIN_EVERY = 6  # every 6th case also runs `kiln train` (one step of a tiny model)

_WILD_VALUES: list[Any] = [
    float("inf"),
    float("-inf"),
    float("nan"),
    -1,
    0,
    10**30,
    True,
    False,
    None,
    "",
    "名前🍲",
    "../../etc",
    "\x00",
    [],
    {},
    [1, "a", None],
    {"a": {"b": {"c": 1}}},
    "1e-3",
    1e308,
    -0.0,
]

_YAML_SNIPPETS = [
    "[" * 5000 + "]" * 5000,
    "a: &x [1, 2]\nb: [*x, *x, *x]\n",
    "{" * 300,
    ": : :",
    "\t- tab",
    "!!python/object:os.system ls",
    "key: !!binary aGVsbG8=",
    "train: {max_steps: 9" + "9" * 5000 + "}",
    "optim: {lr: .inf}",
    "? [complex, key]\n: value",
    "1: 2\nnull: 3",
    "%YAML 9.9\n---\na: 1",
    "---\na: 1\n---\nb: 2",
]


def _base_raw(tmp: Path, data: Path) -> dict[str, Any]:
    return {
        "name": "fuzz",
        "output_dir": str(tmp / "run"),
        "seed": 0,
        "model": {
            "arch": "gpt2",
            "hidden_size": 16,
            "num_layers": 1,
            "num_heads": 2,
            "max_position_embeddings": 32,
        },
        "tokenizer": {"vocab_size": 280},
        "data": {"train": str(data), "max_length": 16, "cache_dir": None, "val_split": 0.1},
        "optim": {"lr": 1e-3},
        "train": {"max_steps": 1, "batch_size": 2},
        "log": {"every_steps": 1, "progress": "none", "plots": False},
    }


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaves(v, (*path, k))] or [path]
    return [path]


def _set(node: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        node = node[key]
    if path:
        node[path[-1]] = value


def _mutate_raw(rng: random.Random, raw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A structural mutation of the config dict; returns a description and the new dict."""
    raw = json.loads(json.dumps(raw))
    what = []
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_leaves(raw))
        kind = rng.random()
        if kind < 0.6:
            value = rng.choice(_WILD_VALUES)
            _set(raw, path, value)
            what.append(f"{'.'.join(map(str, path))}={value!r}")
        elif kind < 0.75:
            _set(raw, (*path[:-1], path[-1] + "_typo"), 1)
            what.append(f"unknown key near {'.'.join(map(str, path))}")
        elif kind < 0.9 and len(path) > 1:
            parent = raw
            for key in path[:-1]:
                parent = parent[key]
            parent.pop(path[-1], None)
            what.append(f"del {'.'.join(map(str, path))}")
        else:
            deep: Any = 1
            for _ in range(rng.choice([50, 200, 400])):
                deep = [deep]
            _set(raw, path, deep)
            what.append(f"{'.'.join(map(str, path))}=nested")
    return "; ".join(what), raw


def _config_case(rng: random.Random, tmp: Path, data: Path) -> tuple[str, bytes]:
    """One config file's bytes: structurally mutated, textually mutated, or garbage."""
    base = _base_raw(tmp, data)
    roll = rng.random()
    if roll < 0.55:
        what, raw = _mutate_raw(rng, base)
        try:
            text = yaml.safe_dump(raw, allow_unicode=True)
        except (yaml.YAMLError, RecursionError):
            text = json.dumps(raw)  # JSON is YAML
        return what, text.encode()
    text = yaml.safe_dump(base).encode()
    if roll < 0.7:
        return "random bytes", bytes(rng.randrange(256) for _ in range(rng.randint(0, 400)))
    if roll < 0.8:
        cut = rng.randint(0, len(text))
        return f"truncated at {cut}", text[:cut]
    if roll < 0.9:
        snippet = rng.choice(_YAML_SNIPPETS)
        return f"snippet {snippet[:30]!r}", snippet.encode()
    pos = rng.randint(0, len(text))
    junk = rng.choice([b"\xff\xfe", b"\x00", b"\t", b"\xef\xbb\xbf", "é".encode("latin-1"), b"*"])
    return f"junk {junk!r} at {pos}", text[:pos] + junk + text[pos:]


def _data_case(rng: random.Random) -> tuple[str, bytes]:
    """A JSONL file: valid recipe rows with some lines replaced by hostile ones."""
    rows = [json.dumps(r) for r in make_rows(30, seed=rng.randrange(1000))]
    hostile: list[tuple[str, Callable[[], str]]] = [
        ("deep list", lambda: "[" * 100_000 + "]" * 100_000),
        ("deep text", lambda: '{"text": ' + "[" * 50_000 + '"x"' + "]" * 50_000 + "}"),
        ("huge int", lambda: '{"text": "a", "quality_score": 1' + "0" * 5000 + "}"),
        ("inf", lambda: '{"text": "a b c", "quality_score": 1e400}'),
        ("nan", lambda: '{"text": "a b c", "quality_score": NaN}'),
        ("wrong type", lambda: json.dumps({"text": rng.choice([5, None, [1, 2], {"a": 1}])})),
        ("no text", lambda: json.dumps({"title": "x"})),
        ("not an object", lambda: rng.choice(["5", "null", '"text"', "[]"])),
        ("garbage", lambda: "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(40))),
        ("torn", lambda: rows[0][: len(rows[0]) // 2]),
        ("unicode", lambda: json.dumps({"text": "Título: 🍲 " * 20}, ensure_ascii=False)),
        ("long", lambda: json.dumps({"text": "word " * 60_000})),
        ("empty", lambda: ""),
    ]
    what = []
    lines: list[str | bytes] = list(rows)
    for _ in range(rng.randint(1, 3)):
        name, make = rng.choice(hostile)
        lines.insert(rng.randrange(len(lines) + 1), make())
        what.append(name)
    if rng.random() < 0.15:
        lines.insert(rng.randrange(len(lines) + 1), b"\xff\xfe\x00bad bytes")
        what.append("non-utf8 line")
    body = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    return ", ".join(what), body


def _check(
    label: str, argv: list[str], capsys: pytest.CaptureFixture[str], failures: list[str]
) -> int | None:
    try:
        code = main(argv)
    except BaseException as exc:  # anything escaping main() would be a traceback
        failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")
        return None
    err = capsys.readouterr().err
    bad = [x for x in err.splitlines() if x.strip() and not x.startswith("kiln")]
    if code not in (0, 2) or "Traceback" in err or bad:
        failures.append(f"{label}: exit {code}, stderr {err[-300:]!r}")
    return code


def test_fuzzed_configs_and_data_never_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(SEED)
    good_data = tmp_path / "good.jsonl"
    good_data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(40, seed=3)))
    failures: list[str] = []
    cases = codes_2 = trained = 0
    for i in range(CONFIG_CASES):
        what, body = _config_case(rng, tmp_path / f"c{i}", good_data)
        path = tmp_path / f"config-{i}.yaml"
        path.write_bytes(body)
        label = f"config case {i} ({what})"
        for command in (["config", "validate"], ["train"] if i % TRAIN_EVERY == 0 else None):
            if command is None:
                continue
            cases += 1
            argv = ["-q", *command, str(path)]
            code = _check(label + f" [{command[0]}]", argv, capsys, failures)
            codes_2 += code == 2
            trained += code == 0 and command[0] == "train"
    for i in range(DATA_CASES):
        what, body = _data_case(rng)
        data = tmp_path / f"data-{i}.jsonl"
        data.write_bytes(body)
        raw = _base_raw(tmp_path / f"d{i}", data)
        if rng.random() < 0.5:
            raw["data"]["on_bad_row"] = "skip"
        path = tmp_path / f"data-config-{i}.yaml"
        path.write_text(yaml.safe_dump(raw))
        label = f"data case {i} ({what}, on_bad_row={raw['data'].get('on_bad_row', 'error')})"
        commands = [["data", "preview", "--samples", "1"]]
        if i % TRAIN_EVERY == 0:
            commands.append(["train"])
        for command in commands:
            cases += 1
            argv = ["-q", *command, str(path)]
            code = _check(label + f" [{command[0]}]", argv, capsys, failures)
            codes_2 += code == 2
            trained += code == 0 and command[0] == "train"
    assert cases >= 300
    assert codes_2 >= cases // 3  # the generator mostly produces bad input: it reached the checks
    assert trained >= 5  # and some of it is odd but valid: those cases train for real
    kinds = Counter(f.split("]: ", 1)[-1].split(":")[0] for f in failures)
    assert failures == [], (
        f"{len(failures)} of {cases} cases failed ({dict(kinds)}):\n" + "\n".join(failures[:20])
    )
