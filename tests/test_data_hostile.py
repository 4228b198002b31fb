"""Hostile data: nesting, huge numbers and huge lines give one `file:line` error or a counted
drop, never a traceback, and the work per row stays bounded. Also: progress lines for slow
data preparation, and silence for quick ones."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import make_rows, write_jsonl

from kiln.cli import main
from kiln.config import RunConfig, load_config
from kiln.data import build_datasets, load_splits, make_format, render_rows
from kiln.data.limits import MAX_DEPTH, max_line_bytes, split_text
from kiln.data.sources import ReadOptions, read_text
from kiln.data.tokenize import _batches, encode
from kiln.errors import DataError
from kiln.models import build_tokenizer, train_bpe_tokenizer

_WORDS = ["chop", "stir", "simmer", "bake", "whisk", "season", "the", "a", "of", "lemon", "rice"]


def make_cfg(train: Path, task: str = "causal_lm", **data: Any) -> RunConfig:
    data = {"train": str(train), "val_split": 0.0, "cache_dir": None, **data}
    arch = "t5" if task == "seq2seq" else "gpt2"
    return load_config(
        data={
            "task": task,
            "model": {"arch": arch, "hidden_size": 32, "num_layers": 1, "num_heads": 2},
            "tokenizer": {"vocab_size": 300},
            "data": data,
            "train": {"max_steps": 10},
        }
    )


def words(n_chars: int, seed: int = 0) -> str:
    """Recipe-like words, space-separated, about `n_chars` characters."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        word = rng.choice(_WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def nested(depth: int) -> str:
    """An array nested `depth` levels deep, as JSON."""
    return "[" * depth + "]" * depth


def one_line_error(exc: pytest.ExceptionInfo[DataError]) -> str:
    assert len(exc.value.problems) == 1, exc.value.problems
    return exc.value.problems[0]


# --- nesting -----------------------------------------------------------------------------------


def test_jsonl_line_nested_100000_deep_is_a_file_line_error(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n' + nested(100_000) + "\n")
    with pytest.raises(DataError) as exc:
        load_splits(make_cfg(path))
    assert one_line_error(exc) == f"{path}:2: arrays/objects nested more than 100 levels deep"


def test_deeply_nested_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [
        '{"text": "ok"}',
        f'{{"text": {nested(100_000)}}}',
        # The row's object is a level: MAX_DEPTH + 1 levels, which json.loads parses but the
        # walk over the values finds; then exactly MAX_DEPTH levels, allowed.
        f'{{"text": "x", "meta": {nested(MAX_DEPTH)}}}',
        f'{{"text": "y", "meta": {nested(MAX_DEPTH - 1)}}}',
    ]
    path.write_text("\n".join(lines) + "\n")
    train, _, stats = load_splits(make_cfg(path, on_bad_row="skip"))
    assert [r["text"] for r in train] == ["ok", "y"]
    assert stats.bad_rows == 2
    assert stats.bad_row_examples == [
        f"{path}:2: arrays/objects nested more than 100 levels deep",
        f"{path}:3: arrays/objects nested more than 100 levels deep",
    ]


def test_template_list_field_nested_deep_is_a_file_line_error(tmp_path: Path) -> None:
    # Templates join list fields with str(item): a list nested ~950 levels (which json.loads
    # still parses) would render as a wall of brackets, or hit the recursion limit.
    deep = "[" * 950 + '"x"' + "]" * 950
    path = tmp_path / "d.jsonl"
    path.write_text('{"source": "a", "target": "b"}\n' + f'{{"source": {deep}, "target": "c"}}\n')
    with pytest.raises(DataError) as exc:
        load_splits(make_cfg(path, task="seq2seq"))
    assert one_line_error(exc).startswith(f"{path}:2: arrays/objects nested")


def test_json_file_nested_deep_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[{"text": "ok"},\n\n {"text": ' + nested(100_000) + "}]\n")
    with pytest.raises(DataError) as exc:
        load_splits(make_cfg(path))
    assert one_line_error(exc) == f"{path}:3: arrays/objects nested more than 100 levels deep"
    # Parsable but deeper than MAX_DEPTH: that item is a bad row.
    path.write_text(f'[{{"text": "ok"}},\n {{"text": "x", "meta": {nested(200)}}}]')
    train, _, stats = load_splits(make_cfg(path, on_bad_row="skip"))
    assert [r["text"] for r in train] == ["ok"]
    assert stats.bad_row_examples == [f"{path}:2: arrays/objects nested more than 100 levels deep"]


# --- numbers -----------------------------------------------------------------------------------


def test_integer_too_long_for_python_is_a_file_line_error(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "ok"}\n{"text": "x", "n": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError) as exc:
        load_splits(make_cfg(jsonl))
    assert one_line_error(exc) == (
        f"{jsonl}:2: invalid JSON (an integer with more than 4300 digits)"
    )
    as_json = tmp_path / "d.json"
    as_json.write_text('[{"text": "ok"},\n{"text": "x",\n "n": -' + "9" * 5000 + "}]\n")
    with pytest.raises(DataError) as exc:
        load_splits(make_cfg(as_json))
    assert one_line_error(exc).startswith(f"{as_json}:3: invalid JSON (an integer with more")


def test_numbers_beyond_the_float_range_are_file_line_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    curriculum = {"stages": [{"until": 1, "max_difficulty": 1}, {}]}
    for huge in ("1e400", "1" + "0" * 400):  # inf after json.loads; an int float() refuses
        for name, data in (
            ("quality_score", {"min_quality_score": 0.5}),
            ("difficulty", {"curriculum": curriculum}),
        ):
            path.write_text(f'{{"text": "a b", "{name}": 1}}\n{{"text": "c", "{name}": {huge}}}')
            with pytest.raises(DataError) as exc:
                load_splits(make_cfg(path, **data))
            assert one_line_error(exc).startswith(f"{path}:2: field '{name}' must be finite")


# --- size --------------------------------------------------------------------------------------


def test_max_chars_has_a_default_far_above_a_document() -> None:
    assert make_cfg(Path("x.jsonl")).data.max_chars == 100_000
    assert make_cfg(Path("x.jsonl"), max_chars=None).data.max_chars is None


def test_huge_jsonl_line_is_dropped_unparsed_and_counted(tmp_path: Path) -> None:
    limit = max_line_bytes(100_000)
    assert limit is not None
    path = tmp_path / "d.jsonl"
    # Not even valid JSON: parsed, it would be a bad row and stop the run.
    huge = '{"text": "' + words(limit + 10) + "\n"
    path.write_text('{"text": "a"}\n' + huge + '{"text": "b"}\n')
    train, _, stats = load_splits(make_cfg(path))
    assert [r.where for r in train] == [f"{path}:1", f"{path}:3"]
    assert (stats.rows_read, stats.dropped["too_long"]) == (3, 1)
    # A line just under the bound is parsed, then dropped for its rendered length.
    path.write_text('{"text": "a"}\n' + json.dumps({"text": "x" * 100_001}) + "\n")
    train, _, stats = load_splits(make_cfg(path))
    assert (len(train), stats.dropped["too_long"]) == (1, 1)
    # No limit: everything is read.
    assert len(load_splits(make_cfg(path, max_chars=None))[0]) == 2


def test_single_huge_text_line_is_cut_into_rows_of_max_chars(tmp_path: Path) -> None:
    line = words(3_000_000)
    path = tmp_path / "corpus.txt"
    path.write_text("Title: Rice\n" + line + "\n")
    train, _, stats = load_splits(make_cfg(path))
    assert train[0]["text"] == "Title: Rice"
    pieces = [r["text"] for r in train[1:]]
    assert "".join(pieces) == line  # nothing lost, nothing added
    assert max(len(p) for p in pieces) <= 100_000
    assert min(len(p) for p in pieces[:-1]) > 99_900  # cut at the last space within the limit
    assert all(p.startswith(" ") for p in pieces[1:])  # cut between words
    assert {r.where for r in train[1:]} == {f"{path}:2"}
    assert stats.dropped["too_long"] == 0
    # No limit: the line stays one row.
    rows = read_text(path, ReadOptions(max_chars=None))
    assert [r["text"] for r in rows] == ["Title: Rice", line]


def test_split_text_pieces_join_back_within_the_limit() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("ab  \n\t.") for _ in range(rng.randint(0, 80)))
        limit = rng.randint(1, 12)
        pieces = split_text(text, limit)
        assert "".join(pieces) == text
        assert all(0 < len(p) <= limit for p in pieces) or pieces == [""]
    assert split_text("hello world foo bar baz", 8) == ["hello", " world", " foo bar", " baz"]
    assert split_text("abcdefghij", 4) == ["abcd", "efgh", "ij"]  # no space: cut at the limit


def test_bpe_training_sees_pieces_and_learns_the_same_tokenizer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kiln.models.tokenizer as tokenizer_module

    text = words(20_000).replace(" stir ", " stir,\n").replace(" a ", "  a\t") + " 12 it's"
    monkeypatch.setattr(tokenizer_module, "_TRAIN_PIECE_CHARS", 10**9)
    whole = train_bpe_tokenizer([text, "short text"], vocab_size=320)
    monkeypatch.setattr(tokenizer_module, "_TRAIN_PIECE_CHARS", 64)
    pieces = list(tokenizer_module._pieces([text, "short text"]))
    assert max(len(p) for p in pieces) <= 64
    assert "".join(pieces) == text + "short text"
    cut = train_bpe_tokenizer([text, "short text"], vocab_size=320)
    # Cut between words, the pre-tokenized words and so the vocabulary are unchanged.
    assert cut.backend_tokenizer.to_str() == whole.backend_tokenizer.to_str()


def test_encode_batches_are_bounded_in_characters() -> None:
    long = ["x" * 3_000_000] * 3
    assert [len(b) for b in _batches(long)] == [1, 1, 1]
    assert [len(b) for b in _batches(["ab"] * 5000)] == [4096, 904]
    assert [len(b) for b in _batches(["y" * 10_000_000])] == [1]


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_prints_one_line_for_hostile_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", make_rows(10))
    with data.open("a") as f:
        f.write(f'{{"text": {nested(100_000)}}}\n')
    cfg = {
        "model": {"arch": "gpt2", "hidden_size": 32, "num_layers": 1, "num_heads": 2},
        "data": {"train": str(data), "cache_dir": None},
        "train": {"max_steps": 2},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["data", "preview", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kiln: error: {data}:11: arrays/objects nested more than 100 levels deep"]


# --- progress ----------------------------------------------------------------------------------


def _prepare(cfg: RunConfig) -> None:
    train, val, stats = load_splits(cfg)
    texts = ["\n".join(parts) for parts in render_rows(make_format(cfg), train)]
    tokenizer = build_tokenizer(cfg, texts)
    build_datasets(cfg, tokenizer, train, val, stats=stats)


def test_slow_data_preparation_logs_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import kiln.data.progress as progress
    import kiln.models.tokenizer as tokenizer_module

    # Every phase counts as slow: each reports.
    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    monkeypatch.setattr(tokenizer_module, "_ANNOUNCE_CHARS", 0)
    path = write_jsonl(tmp_path / "train.jsonl", make_rows(40))
    with caplog.at_level(logging.INFO, logger="kiln"):
        _prepare(make_cfg(path, max_length=32))
    lines = "".join(f"\n{r.getMessage()}" for r in caplog.records)
    assert f"\nread 40 rows from {path} in " in lines
    assert f"\nchecked and filtered 40 rows of {path} in " in lines
    assert "\ntraining a byte-level BPE tokenizer on 40 texts (" in lines
    assert f"\ntokenizing training data ({path}): 40/40 texts (100%)" in lines
    assert f"\ntokenizing training data ({path}): 40 texts in " in lines


def test_quick_data_preparation_stays_quiet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", make_rows(40))
    with caplog.at_level(logging.INFO, logger="kiln"):
        _prepare(make_cfg(path, max_length=32))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1  # one line per phase that always reports: the tokenizer's
    assert lines[0].startswith("trained a byte-level BPE tokenizer: ")
    assert "40 texts" in lines[0]


def test_encode_progress_names_what_it_tokenizes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import kiln.data.progress as progress

    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    tokenizer = train_bpe_tokenizer([words(2000)], vocab_size=280)
    with caplog.at_level(logging.INFO, logger="kiln"):
        ids = list(encode(["stir the rice"] * 5000, tokenizer, what="tokenizing things"))
    assert len(ids) == 5000
    updates = [r.getMessage() for r in caplog.records if "so far" in r.getMessage()]
    assert updates[0].startswith("tokenizing things: 4,096/5,000 texts (82%)")
