"""benchmarks/data_scale.py (issue 28): sizes, the seeded corpus cache, and one tiny end-to-end
run of both sides (bare tokenizers and kiln's in-RAM path) in a temp dir."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import pytest
from helpers import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "data_scale.py"


bench = load_script(SCRIPT, "bench_data_scale")


def test_sizes_parse_suffixes_and_print_back():
    assert [bench.parse_size(s) for s in ("20k", "10M", "1B", "1G", "1.5M", "5000")] == [
        20_000,
        10_000_000,
        1_000_000_000,
        1_000_000_000,
        1_500_000,
        5000,
    ]
    assert [bench.size_label(n) for n in (20_000, 10**7, 10**9, 1234)] == [
        "20k",
        "10M",
        "1B",
        "1234",
    ]
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_size("ten")


def test_corpus_is_seeded_cached_and_has_a_gzip_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = bench.ensure_corpus(tmp_path / "a", 3000, seed=7, files=3, tpw=1.3)
    b = bench.ensure_corpus(tmp_path / "b", 3000, seed=7, files=3, tpw=1.3)
    files = bench.corpus_files(a)
    assert [f.name for f in files] == ["part-0000.jsonl", "part-0001.jsonl", "part-0002.jsonl.gz"]
    for fa, fb in zip(files, bench.corpus_files(b), strict=True):
        assert fa.read_bytes() == fb.read_bytes()  # same seed, same bytes
    with gzip.open(files[-1], "rt") as f:
        assert all(json.loads(line)["text"] for line in f)
    manifest = (a / "manifest.json").stat().st_mtime_ns
    assert bench.ensure_corpus(tmp_path / "a", 3000, seed=7, files=3, tpw=1.3) == a
    assert (a / "manifest.json").stat().st_mtime_ns == manifest  # reused, not regenerated
    words = json.loads((a / "manifest.json").read_text())["words"]
    assert 3000 / 1.3 <= words < 3000 / 1.3 + 8000  # the budget, overshot by < one document


@pytest.mark.slow
def test_tiny_run_measures_bare_and_kiln_and_marks_prepare(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--tokens", "20k", "--corpus-dir", str(tmp_path / "c"), "--files", "2"]
    argv += ["--sample-docs", "100", "--vocab", "300", "--json", str(out)]
    assert bench.main(argv) == 0
    rows = {(r["size"], r["side"]): r for r in json.loads(out.read_text())["rows"]}
    bare, kiln = rows[("20k", "bare")], rows[("20k", "kiln")]
    assert bare["tokens"] > 15000
    assert bare["ratio"] == 1.0
    assert kiln["tokens"] == bare["tokens"]
    assert kiln["wall_s"] > 0
    assert kiln["peak_rss_mb"] > 0
    assert kiln["kiln_target_tokens"] > 0
    assert kiln["ratio"] > 0
    prepare = rows[("20k", "prepare")]
    assert prepare["tokens"] == bare["tokens"]
    assert prepare["wall_s"] > 0
    assert prepare["shards"] == 1
    assert prepare["prepare_tokens"] == kiln["stats"]["rows_read"] + bare["tokens"]  # + EOS each
    assert prepare["stats"]["rows_read"] == kiln["stats"]["rows_read"]
    printed = capsys.readouterr().out
    assert "| 20k | kiln |" in printed
    assert "load average" in printed


def test_item02_prepare_sides_per_worker_count_and_the_cpu_column():
    assert bench.side_kind("prepare-w2") == ("prepare", 2)
    assert bench.side_kind("prepare") == ("prepare", None)
    assert bench.side_kind("bare") == ("bare", None)
    row = bench._row("10M", "prepare-w2", wall_s=2.0, cpu_s=3.5, tokens=10, tokens_per_s=5.0)
    lines = bench.table([row]).splitlines()
    assert lines[0].startswith("| size | side | wall s | CPU s | tokens |")
    assert lines[2].startswith("| 10M | prepare-w2 | 2.00 | 3.5 | 10 | 5 |")
