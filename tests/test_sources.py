"""Tests for data sources (files, globs, datasets, Python objects), bad rows and filters."""

from __future__ import annotations

import csv
import json
import logging
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.config import RunConfig, load_config
from kiln.data import BadRows, IndexRow, ReadOptions, load_splits, read_rows, rows_from_python
from kiln.data.sources import read_csv, read_json, read_text
from kiln.errors import DataError
from kiln.registry import MissingExtra


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_cfg(train: Any, task: str = "causal_lm", **data: Any) -> RunConfig:
    arch = "t5" if task == "seq2seq" else "gpt2"
    data["train"] = [str(t) for t in train] if isinstance(train, list) else str(train)
    data.setdefault("val_split", 0.0)
    return load_config(
        data={"task": task, "model": {"arch": arch}, "data": data, "train": {"max_steps": 10}}
    )


def texts(rows: list[Any]) -> list[str]:
    return [r["text"] for r in rows]


@pytest.fixture
def hf_datasets() -> Any:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    return datasets


# --- file formats ---------------------------------------------------------------------------


def test_jsonl_through_load_splits(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])
    train, val, stats = load_splits(make_cfg(path))
    assert texts(train) == ["a", "b"]
    assert [r.where for r in train] == [f"{path}:1", f"{path}:2"]
    assert (val, stats.rows_read, stats.bad_rows) == ([], 2, 0)


def test_json_list_rows_name_the_line_their_object_starts_on(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n\n  {"text":\n    "b"}, {"text": "c"}\n]\n')
    rows = read_json(path)
    assert texts(rows) == ["a", "b", "c"]
    assert [r.line for r in rows] == [2, 4, 5]
    assert texts(load_splits(make_cfg(path))[0]) == ["a", "b", "c"]


def test_json_object_with_data_list(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('{"version": 2, "data": [\n{"text": "a"},\n{"text": "b"}],\n"n": [1]}')
    rows = read_json(path)
    assert texts(rows) == ["a", "b"]
    assert [r.where for r in rows] == [f"{path}:2", f"{path}:3"]


def test_json_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[{"text": "a"},\n 7,\n "s"]')
    with pytest.raises(DataError) as exc:
        read_json(path)
    assert exc.value.problems == [
        f"{path}:2: expected a JSON object, got number",
        f"{path}:3: expected a JSON object, got string",
    ]
    path.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON \(Expecting value"):
        read_json(path)
    path.write_text('[{"text": "a}]')
    with pytest.raises(DataError, match=r":1: invalid JSON \(Unterminated string starting at col"):
        read_json(path)
    path.write_text('{"rows": []}')
    with pytest.raises(DataError, match='an object with a "data" list; got an object without'):
        read_json(path)


def test_csv_values_are_strings_and_lines_are_the_files(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["text", "quality_score"])
        out.writerow(["one line", "0.9"])
        out.writerow(["two\nlines, quoted", "0.8"])
        f.write("\n")  # a blank line is skipped
        out.writerow(["low", "0.1"])
    rows = read_csv(path)
    assert rows == [
        {"text": "one line", "quality_score": "0.9"},
        {"text": "two\nlines, quoted", "quality_score": "0.8"},
        {"text": "low", "quality_score": "0.1"},
    ]
    assert [r.line for r in rows] == [2, 3, 6]
    train, _, stats = load_splits(make_cfg(path, min_quality_score=0.5))  # numeric strings
    assert texts(train) == ["one line", "two\nlines, quoted"]
    assert stats.dropped["low_quality"] == 1


def test_csv_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,title\na,b\nc\nd,e,f\n")
    with pytest.raises(DataError) as exc:
        read_csv(path)
    assert exc.value.problems == [
        f"{path}:3: expected 2 values (the header's), got 1",
        f"{path}:4: expected 2 values (the header's), got 3",
    ]
    path.write_text("text,text\na,b\n")
    with pytest.raises(DataError, match=rf"^{path}:1: repeated column name"):
        read_csv(path)
    path.write_bytes(b"text\nok\nbad \xff byte\n")
    with pytest.raises(DataError, match=rf"^{path}:3: not valid UTF-8 \(byte 5\)$"):
        read_csv(path)


def test_text_file_one_row_per_nonblank_line(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_bytes(b"\xef\xbb\xbffirst line\r\n\n   \n  second, indented\nlast")
    rows = read_text(path)
    assert texts(rows) == ["first line", "  second, indented", "last"]
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:4", f"{path}:5"]
    body = load_splits(make_cfg(path, text_field="body"))[0]  # the line goes to text_field
    assert [r["body"] for r in body] == texts(rows)
    log = tmp_path / "notes.log"  # an unknown suffix is JSONL unless data.format says
    log.write_text("plain words\n")
    assert texts(load_splits(make_cfg(log, format="text"))[0]) == ["plain words"]
    with pytest.raises(DataError, match=r"notes\.log:1: invalid JSON"):
        load_splits(make_cfg(log))


def test_text_bad_utf8_line_is_a_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_bytes(b"good\nbad \xff\nfine\n")
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8 \(byte 5\)$"):
        read_text(path)
    bad = BadRows(skip=True)
    assert texts(read_text(path, ReadOptions(bad=bad))) == ["good", "fine"]
    assert (bad.count, bad.examples) == (1, [f"{path}:2: not valid UTF-8 (byte 5)"])


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    table = pa.table({"text": ["a", "b", "a"], "quality_score": [0.9, 0.1, 0.8]})
    pq.write_table(table, path)
    rows = read_rows(path)
    assert rows == [
        {"text": "a", "quality_score": 0.9},
        {"text": "b", "quality_score": 0.1},
        {"text": "a", "quality_score": 0.8},
    ]
    assert [r.where for r in rows] == [f"{path}#0", f"{path}#1", f"{path}#2"]
    train, _, stats = load_splits(make_cfg(path, min_quality_score=0.5))
    assert texts(train) == ["a"]
    assert stats.dropped == {"low_quality": 1, "too_long": 0, "duplicate": 1, "max_samples": 0}
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match=rf"^{bad}: cannot read Parquet \("):
        read_rows(bad)


def test_missing_extra_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"")
    for source, package in ((path, "pyarrow"), ("hf:someone/recipes", "datasets")):
        with pytest.raises(MissingExtra) as exc:
            read_rows(source)
        (line,) = exc.value.problems
        assert line.startswith(f"reading {source} needs {package} (")
        assert line.endswith("install it with: pip install 'kiln[data]'")


# --- globs and lists ------------------------------------------------------------------------


def test_glob_reads_matches_sorted(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        write_jsonl(tmp_path / name, [{"text": name}])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "d.jsonl", [{"text": "d.jsonl"}])
    train = load_splits(make_cfg(tmp_path / "*.jsonl"))[0]
    assert texts(train) == ["a.jsonl", "b.jsonl"]
    assert texts(read_rows(str(tmp_path / "**" / "*.jsonl"))) == ["a.jsonl", "b.jsonl", "d.jsonl"]


def test_glob_matching_nothing_is_an_error(tmp_path: Path) -> None:
    pattern = tmp_path / "*.parquet"
    with pytest.raises(DataError, match=rf"^{re.escape(str(pattern))}: no files match this"):
        load_splits(make_cfg(pattern))


def test_list_of_sources_in_order_with_mixed_formats(tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "one.jsonl", [{"text": "x"}, {"text": "y"}])
    second = tmp_path / "two.csv"
    second.write_text("text\nz\nx\n")
    val = tmp_path / "val.txt"
    val.write_text("v1\nv2\n")
    cfg = make_cfg([second, first], val=str(val))
    train, val_rows, stats = load_splits(cfg)
    assert texts(train) == ["z", "x", "y"]  # the second "x" (one.jsonl:1) is a duplicate
    assert texts(val_rows) == ["v1", "v2"]
    assert (stats.rows_read, stats.dropped["duplicate"]) == (6, 1)


def test_empty_source_and_plain_directory_are_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=rf"^{empty}: no rows \(the data is empty\)$"):
        load_splits(make_cfg(empty))
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DataError, match=r"folder: is a directory, expected a data file or a"):
        load_splits(make_cfg(folder))


# --- datasets -------------------------------------------------------------------------------


def test_saved_dataset(tmp_path: Path, hf_datasets: Any) -> None:
    ds = hf_datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}])
    ds.save_to_disk(str(tmp_path / "saved"))
    train = load_splits(make_cfg(tmp_path / "saved"))[0]
    assert texts(train) == ["a", "b"]
    assert train[1].where == f"{tmp_path / 'saved'}#1"
    assert pickle.loads(pickle.dumps(train[1])).where == train[1].where


def test_saved_dataset_dict_reads_hf_split(tmp_path: Path, hf_datasets: Any) -> None:
    dd = hf_datasets.DatasetDict(
        train=hf_datasets.Dataset.from_list([{"text": "t"}]),
        test=hf_datasets.Dataset.from_list([{"text": "u"}, {"text": "w"}]),
    )
    path = tmp_path / "dd"
    dd.save_to_disk(str(path))
    assert texts(load_splits(make_cfg(path))[0]) == ["t"]
    train = load_splits(make_cfg(path, hf_split="test"))[0]
    assert texts(train) == ["u", "w"]
    assert [r.where for r in train] == [f"{path}[test]#0", f"{path}[test]#1"]
    with pytest.raises(DataError, match=r"no split 'dev' \(data\.hf_split\); .* has: train, test"):
        load_splits(make_cfg(path, hf_split="dev"))


def test_hub_dataset_goes_through_load_dataset(
    monkeypatch: pytest.MonkeyPatch, hf_datasets: Any
) -> None:
    calls = []

    def fake_load_dataset(name: str, split: str) -> Any:
        calls.append((name, split))
        if name == "missing/set":
            raise FileNotFoundError("Couldn't find 'missing/set' on the Hub\nmore detail")
        return hf_datasets.Dataset.from_list([{"text": "hub row"}])

    monkeypatch.setattr(hf_datasets, "load_dataset", fake_load_dataset)
    train = load_splits(make_cfg("hf:someone/recipes", hf_split="validation"))[0]
    assert calls == [("someone/recipes", "validation")]
    assert [(r["text"], r.where) for r in train] == [
        ("hub row", "hf:someone/recipes[validation]#0")
    ]
    with pytest.raises(DataError) as exc:  # data.format: hf makes the prefix optional
        load_splits(make_cfg("missing/set", format="hf"))
    assert exc.value.problems == [
        "missing/set: cannot load the dataset (FileNotFoundError: Couldn't find 'missing/set' "
        "on the Hub)"
    ]


# --- Python objects -------------------------------------------------------------------------


class _MapStyle(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"text": f"item {i}", "n": torch.tensor(i)}


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self) -> Any:
        yield from ({"text": f"s{i}"} for i in range(3))


def test_rows_from_python(hf_datasets: Any) -> None:
    rows = rows_from_python([{"text": "a"}, {"text": "b"}])
    assert all(isinstance(r, IndexRow) for r in rows)
    assert [r.where for r in rows] == ["<python>#0", "<python>#1"]
    assert texts(rows_from_python(_MapStyle())) == ["item 0", "item 1"]
    assert texts(rows_from_python(_Stream(), name="stream")) == ["s0", "s1", "s2"]
    ds = hf_datasets.Dataset.from_list([{"text": "x"}, {"text": "y"}])
    assert [(r["text"], r.where) for r in rows_from_python(ds)] == [
        ("x", "<python>#0"),
        ("y", "<python>#1"),
    ]
    with pytest.raises(DataError, match=r"DatasetDict; pass one split"):
        rows_from_python(hf_datasets.DatasetDict(train=ds))


def test_rows_from_python_errors() -> None:
    with pytest.raises(DataError, match=r"^<python>: expected a list of dicts.*got dict$"):
        rows_from_python({"text": "a"})
    with pytest.raises(DataError) as exc:
        rows_from_python([{"text": "a"}, "b", 3])
    assert exc.value.problems == [
        "<python>#1: expected a dict, got str",
        "<python>#2: expected a dict, got int",
    ]
    bad = BadRows(skip=True)
    assert texts(rows_from_python([{"text": "a"}, "b"], bad=bad)) == ["a"]
    assert bad.count == 1


# --- bad rows -------------------------------------------------------------------------------


def _bad_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(
            [
                '{"text": "good one", "quality_score": 0.9}',
                '{"text": ',  # 2: bad JSON
                "[1]",  # 3: not an object
                '{"body": "x", "quality_score": 0.9}',  # 4: missing field
                '{"text": 5, "quality_score": 0.9}',  # 5: wrong type
                '{"text": "no score"}',  # 6: missing quality field
                '{"text": "good two", "quality_score": 0.7}',
                '{"text": "bad score", "quality_score": "high"}',  # 8: wrong type
                '{"text": "low", "quality_score": 0.1}',
            ]
        )
        + "\n"
    )
    return path


def test_bad_rows_are_errors_by_default(tmp_path: Path) -> None:
    path = _bad_jsonl(tmp_path)
    with pytest.raises(DataError) as exc:
        load_splits(make_cfg(path, min_quality_score=0.5))
    assert [p.split(": ", 1)[0] for p in exc.value.problems] == [f"{path}:2", f"{path}:3"]


def test_skip_counts_bad_rows_and_names_the_first_five(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _bad_jsonl(tmp_path)
    with caplog.at_level(logging.WARNING, logger="kiln"):
        train, _, stats = load_splits(make_cfg(path, min_quality_score=0.5, on_bad_row="skip"))
    assert texts(train) == ["good one", "good two"]
    assert stats.bad_rows == 6
    assert stats.bad_row_examples == [
        f"{path}:2: invalid JSON (Expecting value at column 10)",
        f"{path}:3: expected a JSON object, got array",
        f"{path}:4: missing field 'text'",
        f"{path}:5: field 'text' must be a string, got number",
        f"{path}:6: missing field 'quality_score' (needed by data.min_quality_score)",
    ]
    assert stats.dropped["low_quality"] == 1
    assert stats.rows_read == 9 == stats.bad_rows + sum(stats.dropped.values()) + len(train)
    (record,) = [r for r in caplog.records if r.name == "kiln"]
    assert record.levelno == logging.WARNING
    assert "skipped 6 bad rows (data.on_bad_row=skip)" in record.getMessage()
    assert f"{path}:2: invalid JSON" in record.getMessage()
    assert stats.to_dict()["bad_rows"] == 6


def test_skip_with_nothing_left_says_why(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "a"}, {"body": "b"}])
    with pytest.raises(DataError) as exc:
        load_splits(make_cfg(path, on_bad_row="skip"))
    assert exc.value.problems == [
        f"{path}: no rows left after filtering (2 read: 2 bad rows (data.on_bad_row=skip)); "
        f"first bad row: {path}:1: missing field 'text'"
    ]


def test_skip_template_problems_in_seq2seq(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"src": "a", "tgt": "b"}, {"src": "c"}])
    cfg = make_cfg(
        path, task="seq2seq", source_template="{src}", target_template="{tgt}", on_bad_row="skip"
    )
    train, _, stats = load_splits(cfg)
    assert [r["src"] for r in train] == ["a"]
    assert stats.bad_row_examples == [
        f"data.target_template: field 'tgt' is not in the rows ({path}:2)"
    ]


# --- filters --------------------------------------------------------------------------------


def test_length_filters_count_by_reason(tmp_path: Path) -> None:
    rows = ["ab", "abcde", "abcdefghij", "abcdefghijklmnop", "abcde", "xyz"]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in rows])
    train, _, stats = load_splits(make_cfg(path, min_chars=3, max_chars=10))
    assert texts(train) == ["abcde", "abcdefghij", "xyz"]
    assert stats.dropped == {
        "low_quality": 0,
        "duplicate": 1,
        "max_samples": 0,
        "too_short": 1,
        "too_long": 1,
    }
    assert stats.rows_read == 6


def test_length_of_a_seq2seq_row_is_source_plus_target(tmp_path: Path) -> None:
    rows = [{"source": "abc", "target": "de"}, {"source": "a", "target": "b"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, _, stats = load_splits(make_cfg(path, task="seq2seq", min_chars=5))
    assert [r["source"] for r in train] == ["abc"]
    assert stats.dropped["too_short"] == 1


def test_dedup_can_be_turned_off(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "same"}] * 3)
    train, _, stats = load_splits(make_cfg(path, dedup=False))
    assert len(train) == 3
    assert stats.dropped["duplicate"] == 0
    assert len(load_splits(make_cfg(path))[0]) == 1


def test_everything_filtered_names_every_reason(tmp_path: Path) -> None:
    rows = [{"text": "a", "quality_score": 0.9}, {"text": "long text", "quality_score": 0.9}]
    rows += [{"text": "low", "quality_score": 0.1}, {"text": "tiny"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = make_cfg(path, min_quality_score=0.5, min_chars=2, max_chars=5, on_bad_row="skip")
    with pytest.raises(DataError) as exc:
        load_splits(cfg)
    assert exc.value.problems == [
        f"{path}: no rows left after filtering (4 read: 1 bad rows (data.on_bad_row=skip), "
        "1 below data.min_quality_score=0.5, 1 shorter than data.min_chars=2, "
        "1 longer than data.max_chars=5); "
        f"first bad row: {path}:4: missing field 'quality_score' (needed by "
        "data.min_quality_score)"
    ]
