"""`kiln data prepare` (issue 28, second increment): the training files streamed into token
shards, the same documents as the in-RAM pipeline, once, resumable after a kill."""

from __future__ import annotations

import csv
import errno
import gzip
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from kiln.cli import main
from kiln.config import load_config
from kiln.data import split_indices
from kiln.data.assemble import Given, assemble_data
from kiln.data.shards import MANIFEST, ShardSet, ShardWriter, dedup
from kiln.data.shards import writer as writer_module
from kiln.data.shards.encode import cores
from kiln.data.shards.prepare import DEDUP_RUNS, STATS, Prepared, prepare_shards
from kiln.data.sources import read_rows
from tests.helpers import bpe_tokenizer, make_rows, tiny_raw, write_jsonl


def _corpus(n: int = 60) -> list[dict[str, Any]]:
    rows = make_rows(n)
    rows += rows[:5]  # exact repeats: data.dedup drops them
    rows.append({"text": "short"})  # under data.min_chars
    return rows


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    bpe_tokenizer([r["text"] for r in make_rows(200)]).save_pretrained(path)
    return path


def _config(tmp_path: Path, train: Path, tokenizer_dir: Path, **data: Any) -> Path:
    raw = tiny_raw(
        tmp_path,
        train,
        None,
        tokenizer={"name_or_path": str(tokenizer_dir)},
        model={"max_position_embeddings": 512},
        data={"min_chars": 20, "packing": False, "max_length": 512, **data},
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _prepare(config: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[str, Path]:
    assert main(["data", "prepare", str(config), *extra]) == 0
    out = capsys.readouterr().out.strip()
    sets = list((config.parent / "cache").glob("shards-*"))
    assert len(sets) == 1
    return out, sets[0]


def _checksums(directory: Path) -> list[str]:
    manifest = json.loads((directory / MANIFEST).read_text())
    return [f["sha256"] for s in manifest["shards"] for f in s["files"].values()]


def test_prepare_documents_match_the_in_ram_pipeline_and_a_second_run_is_a_no_op(
    tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", _corpus())
    config = _config(tmp_path, train, tokenizer_dir, val_split=0.2)
    out, directory = _prepare(config, capsys, "--shard-tokens", "500")
    shards = ShardSet.open(directory, verify="full")
    assert len(shards) == 60  # 66 rows: 5 duplicates and 1 too short dropped
    assert shards.num_shards > 2
    assert out.startswith("prepared 60 documents, ")
    assert f"{shards.num_shards} shards in {directory}" in out

    # Today's path, same config: its training documents are the shard set's documents at the
    # split's training indices (the split is by document index, applied by the reader).
    cfg = load_config(str(config))
    data = assemble_data(cfg, Given())
    train_idx, val_idx = split_indices(len(shards), cfg.data.val_split, cfg.seed)
    assert len(data.train) == len(train_idx)
    assert data.val is not None
    for i, doc in enumerate(train_idx):
        assert data.train[i]["input_ids"].tolist() == shards.doc(doc).tolist()
    for i, doc in enumerate(val_idx):
        assert data.val[i]["input_ids"].tolist() == shards.doc(doc).tolist()

    stats = json.loads((directory / STATS).read_text())
    assert stats["rows_read"] == 66 == data.stats["rows_read"]
    assert stats["dropped"]["duplicate"] == 5
    assert stats["dropped"]["too_short"] == 1
    assert stats["dropped"] == data.stats["dropped"]
    assert stats["documents"] == 60
    assert stats["tokens"] == shards.num_tokens
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}

    out, again = _prepare(config, capsys, "--shard-tokens", "500")
    assert again == directory
    assert out == f"shards exist: {directory} (nothing to do)"
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == before


def test_instruction_samples_and_label_masks_match_the_in_ram_pipeline(
    tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [{"prompt": f"Cook {r['title']}:", "response": r["text"]} for r in make_rows(40)]
    rows.append({"prompt": "x " * 200, "response": "y"})  # no room for a response token
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    config = _config(tmp_path, train, tokenizer_dir, val_split=0.0, max_length=96)
    doc = yaml.safe_load(config.read_text())
    doc["task"] = "instruction"
    config.write_text(yaml.safe_dump(doc))
    out, directory = _prepare(config, capsys, "--shard-tokens", "700")
    shards = ShardSet.open(directory, verify="full")
    # The sample without a target is an empty document at its row's index (item 1 of HA's
    # brief): document i is kept row i.
    assert out.startswith("prepared 41 documents, ")
    assert "no_target 1" in out
    assert len(shards.doc(40)) == 0
    data = assemble_data(load_config(str(config)), Given())
    assert len(data.train) == len(shards) - 1 == 40
    truncated = 0
    for i in range(len(data.train)):
        ids, labels = data.train[i]["input_ids"], data.train[i]["labels"]
        mask = shards.mask(i)
        assert mask is not None
        assert ids.tolist() == shards.doc(i).tolist()
        assert (labels != -100).tolist() == mask.astype(bool).tolist()
        truncated += len(ids) == 96
    assert 0 < truncated < 40  # some responses were cut to data.max_length, as today
    assert json.loads((directory / STATS).read_text())["dropped"]["no_target"] == 1


def test_prepare_reads_gz_text_and_csv_files_with_bad_rows_counted(
    tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = make_rows(30)
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows[:10]) + "not json\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("".join(r["title"] + " is a dish to cook\n" for r in rows[10:20]))
    with gzip.open(tmp_path / "c.csv.gz", "wt", newline="") as f:
        csv.writer(f).writerows([["text", "n"], *[[r["text"], 1] for r in rows[20:25]], ["x"]])
    config = _config(tmp_path, plain, tokenizer_dir, on_bad_row="skip", dedup=False)
    raw = yaml.safe_load(config.read_text())
    gz = ["a.jsonl.gz", "b.txt.gz", "c.csv.gz"]
    raw["data"]["train"] = [str(tmp_path / name) for name in gz]
    config.write_text(yaml.safe_dump(raw))
    out, directory = _prepare(config, capsys)
    assert out.startswith("prepared 25 documents, ")
    assert "bad rows 2," in out
    stats = json.loads((directory / STATS).read_text())
    assert stats["bad_rows"] == 2
    assert stats["rows_read"] == 27
    assert stats["bad_row_examples"][0].startswith(f"{tmp_path / 'a.jsonl.gz'}:11: ")

    # The same rows from plain files give the same documents.
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    for name in gz[1:]:
        (tmp_path / name[:-3]).write_bytes(gzip.decompress((tmp_path / name).read_bytes()))
    raw["data"]["train"] = [str(tmp_path / name[:-3]) for name in gz]
    raw["data"]["cache_dir"] = str(tmp_path / "cache2")
    config.write_text(yaml.safe_dump(raw))
    assert main(["data", "prepare", str(config)]) == 0
    (plain_set,) = (tmp_path / "cache2").glob("shards-*")
    a, b = ShardSet.open(directory), ShardSet.open(plain_set)
    assert [a.doc(i).tolist() for i in range(len(a))] == [b.doc(i).tolist() for i in range(len(b))]


def test_a_missing_source_file_is_one_line_exit_2(
    tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, tmp_path / "absent.jsonl", tokenizer_dir)
    assert main(["data", "prepare", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kiln: error: {tmp_path / 'absent.jsonl'}: no such file"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"data": {"train": "hf:user/corpus"}}, "data.train: hf:user/corpus: kiln data prepare"),
        ({"tokenizer": {"name_or_path": None}}, "tokenizer.name_or_path: not set;"),
    ],
)
def test_what_prepare_cannot_do_yet_is_one_line_exit_2(
    tmp_path: Path,
    tokenizer_dir: Path,
    capsys: pytest.CaptureFixture[str],
    raw: dict[str, Any],
    message: str,
) -> None:
    config = _config(tmp_path, write_jsonl(tmp_path / "t.jsonl", make_rows(5)), tokenizer_dir)
    doc = yaml.safe_load(config.read_text())
    for key, value in raw.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) else value
    config.write_text(yaml.safe_dump(doc))
    assert main(["data", "prepare", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"kiln: error: {message}")


@pytest.mark.slow
def test_a_killed_prepare_continues_to_identical_shards(
    tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(400))
    config = _config(tmp_path, train, tokenizer_dir)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    child = subprocess.Popen(
        [sys.executable, "-m", "kiln", "data", "prepare", str(config), "--shard-tokens", "1000"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(cache.glob("shards-*/shard-00000.done")) and child.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    (directory,) = cache.glob("shards-*")
    assert child.returncode == -signal.SIGKILL, "the prepare finished before it was killed"
    assert not (directory / MANIFEST).exists()
    done_at_kill = len(list(directory.glob("shard-*.done")))
    _, resumed = _prepare(config, capsys, "--shard-tokens", "1000")
    assert resumed == directory

    whole = tmp_path / "whole"
    whole.mkdir()
    raw = yaml.safe_load(config.read_text())
    raw["data"]["cache_dir"] = str(whole / "cache")
    (whole / "config.yaml").write_text(yaml.safe_dump(raw))
    _, uninterrupted = _prepare(whole / "config.yaml", capsys, "--shard-tokens", "1000")
    shards = json.loads((resumed / MANIFEST).read_text())["shards"]
    assert 1 <= done_at_kill < len(shards)  # the kill left shards to write
    assert _checksums(resumed) == _checksums(uninterrupted)
    ShardSet.open(resumed, verify="full")  # every file's sha256 as its manifest says


def test_the_in_ram_readers_read_gz_files_too(tmp_path: Path) -> None:
    rows = make_rows(4)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "b.csv.gz", "wt", newline="") as f:
        csv.writer(f).writerows([["text"], *[[r["text"]] for r in rows]])
    with gzip.open(tmp_path / "c.json.gz", "wt") as f:
        json.dump(rows, f)
    for name in ("a.jsonl.gz", "b.csv.gz", "c.json.gz"):
        read = read_rows(str(tmp_path / name))
        assert [r["text"] for r in read] == [r["text"] for r in rows], name


def _instruction_config(
    tmp_path: Path, rows: list[dict[str, Any]], tokenizer_dir: Path, **data: Any
) -> Path:
    tmp_path.mkdir(exist_ok=True)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    config = _config(tmp_path, train, tokenizer_dir, **{"max_length": 96, **data})
    doc = yaml.safe_load(config.read_text())
    doc["task"] = "instruction"
    config.write_text(yaml.safe_dump(doc))
    return config


def test_item01_a_sample_without_target_is_an_empty_document_at_its_row_index(
    tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [{"prompt": f"Cook {r['title']}:", "response": r["text"]} for r in make_rows(30)]
    rows.insert(7, {"prompt": "x " * 200, "response": "y"})  # the prompt fills max_length
    config = _instruction_config(tmp_path, rows, tokenizer_dir, val_split=0.3)
    out, directory = _prepare(config, capsys, "--shard-tokens", "700")
    shards = ShardSet.open(directory, verify="full")
    assert len(shards) == 31  # one document per kept row
    assert len(shards.doc(7)) == 0
    assert len(shards.mask(7)) == 0
    assert all(len(shards.doc(i)) > 0 for i in range(31) if i != 7)
    assert json.loads((directory / STATS).read_text())["dropped"]["no_target"] == 1
    assert "no_target 1" in out

    # The split by document index is the in-RAM path's split by row (which drops after it).
    cfg = load_config(str(config))
    data = assemble_data(cfg, Given())
    assert data.val is not None
    train_idx, val_idx = split_indices(len(shards), cfg.data.val_split, cfg.seed)
    for part, indices in ((data.train, train_idx), (data.val, val_idx)):
        docs = [shards.doc(i).tolist() for i in indices if len(shards.doc(i))]
        assert [part[i]["input_ids"].tolist() for i in range(len(part))] == docs


def _prepare_direct(config: Path, cache: str, shard_tokens: int = 400, **kw: Any) -> Prepared:
    """`prepare_shards` of `config` with `data.cache_dir` at `<config dir>/<cache>`."""
    cfg = load_config(str(config), overrides=[f"data.cache_dir={config.parent / cache}"])
    return prepare_shards(cfg, shard_tokens=shard_tokens, **kw)


def test_item02_shards_are_identical_whatever_the_number_of_workers(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    config = _config(tmp_path, write_jsonl(tmp_path / "train.jsonl", _corpus(90)), tokenizer_dir)
    runs = [_prepare_direct(config, f"c{w}", workers=w, batch_rows=16) for w in (0, 2, None)]
    assert [r.workers for r in runs] == [0, 2, cores()]  # data.num_workers unset: all cores
    assert "2 tokenizer processes" in runs[1].summary()
    assert runs[0].documents == runs[1].documents == 90
    assert runs[0].shards > 2
    assert _checksums(runs[0].directory) == _checksums(runs[1].directory)
    assert _checksums(runs[0].directory) == _checksums(runs[2].directory)
    assert runs[0].stats == runs[1].stats

    # instruction: samples with masks, one without a target token (an empty document)
    rows = [{"prompt": f"Cook {r['title']}:", "response": r["text"]} for r in make_rows(40)]
    rows.insert(20, {"prompt": "x " * 200, "response": "y"})
    config = _instruction_config(tmp_path / "i", rows, tokenizer_dir)
    runs = [_prepare_direct(config, f"c{w}", workers=w, batch_rows=8) for w in (0, 2)]
    assert _checksums(runs[0].directory) == _checksums(runs[1].directory)
    assert runs[0].stats["dropped"]["no_target"] == runs[1].stats["dropped"]["no_target"] == 1
    assert len(ShardSet.open(runs[1].directory).doc(20)) == 0


def _children(pid: int) -> list[int]:
    """The pids of `pid`'s child processes (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_item02_a_killed_prepare_with_workers_continues_to_identical_shards(
    tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(400))
    config = _config(tmp_path, train, tokenizer_dir, num_workers=2)
    cache = tmp_path / "cache"
    # A forked copy of this process (imports done: no seconds of startup) runs the prepare.
    child = multiprocessing.get_context("fork").Process(
        target=_prepare_direct, args=(config, "cache"), kwargs={"shard_tokens": 1000}
    )
    child.start()
    assert child.pid is not None
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not list(cache.glob("shards-*/shard-00000.done")) and child.is_alive():
            assert time.monotonic() < deadline
            workers = _children(child.pid) or workers
            time.sleep(0.005)
        workers = _children(child.pid) or workers
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert child.exitcode == -signal.SIGKILL, "the prepare finished before it was killed"
    assert len(workers) == 2
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers):  # orphaned workers end themselves
        assert time.monotonic() < deadline, "a tokenizer worker outlived its killed prepare"
        time.sleep(0.05)
    (directory,) = cache.glob("shards-*")
    _, resumed = _prepare(config, capsys, "--shard-tokens", "1000", "data.num_workers=0")
    assert resumed == directory
    whole = _prepare_direct(config, "whole", 1000, workers=0)
    assert whole.directory.name == directory.name
    assert _checksums(resumed) == _checksums(whole.directory)


def _held_prepare(config: Path, inside: Any, release: Any) -> None:
    """A prepare (in a forked child) that stops before its manifest until `release` is set."""
    close = ShardWriter.close

    def held(self: ShardWriter) -> dict[str, Any]:
        inside.set()
        assert release.wait(60)
        return close(self)

    ShardWriter.close = held  # type: ignore[method-assign]  # this child only
    _prepare_direct(config, "cache")


def _logged_prepare(config: Path, log_file: str, results: Any) -> None:
    """A prepare (in a forked child) whose kiln log lines go to `log_file`."""
    logger = logging.getLogger("kiln")
    logger.addHandler(logging.FileHandler(log_file))
    logger.setLevel(logging.INFO)
    results.put(_prepare_direct(config, "cache").existed)


def test_item03_a_second_prepare_of_the_same_set_waits_for_the_first(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    config = _config(tmp_path, write_jsonl(tmp_path / "train.jsonl", _corpus()), tokenizer_dir)
    fork = multiprocessing.get_context("fork")
    inside, release, results = fork.Event(), fork.Event(), fork.Queue()
    first = fork.Process(target=_held_prepare, args=(config, inside, release))
    first.start()
    log_file = tmp_path / "second.log"
    second = None
    try:
        assert inside.wait(60), "the first prepare did not get to its manifest"
        second = fork.Process(target=_logged_prepare, args=(config, str(log_file), results))
        second.start()
        deadline = time.monotonic() + 60
        while "waiting for pid" not in (log_file.read_text() if log_file.exists() else ""):
            assert time.monotonic() < deadline, "the second prepare did not wait"
            assert second.is_alive()
            time.sleep(0.01)
        (directory,) = (tmp_path / "cache").glob("shards-*")
        line = log_file.read_text().strip()
        assert line == f"waiting for pid {first.pid}, which is using the shard set {directory}"
        assert not (directory / MANIFEST).exists()
        release.set()
        first.join(60)
        second.join(60)
        assert (first.exitcode, second.exitcode) == (0, 0)
        assert results.get(timeout=5) is True  # it found the set complete: nothing to do
    finally:
        for process in (first, second):
            if process is not None and process.is_alive():
                process.kill()
    ShardSet.open(directory, verify="full")


def test_item04_a_full_disk_is_exit_5_one_line_and_a_rerun_continues_to_identical_shards(
    tmp_path: Path,
    tokenizer_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = _config(tmp_path, write_jsonl(tmp_path / "train.jsonl", _corpus()), tokenizer_dir)
    real = writer_module.write_chunk

    def full_on_shard_2(file: Any, path: Path, data: Any) -> None:
        if path.name.startswith("shard-00002"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(file, path, data)

    monkeypatch.setattr(writer_module, "write_chunk", full_on_shard_2)
    assert main(["data", "prepare", str(config), "--shard-tokens", "500"]) == 5
    err = capsys.readouterr().err.strip().splitlines()
    (directory,) = (tmp_path / "cache").glob("shards-*")
    assert err == [
        f"kiln: error: no space left on device while writing the token shard "
        f"{directory / 'shard-00002.tokens'}; free some space and rerun kiln data prepare: it "
        f"continues after the 2 complete shards in {directory}"
    ]
    assert not (directory / MANIFEST).exists()

    monkeypatch.setattr(writer_module, "write_chunk", real)
    out, resumed = _prepare(config, capsys, "--shard-tokens", "500")
    assert resumed == directory
    assert out.startswith("prepared 60 documents, ")
    whole = _prepare_direct(config, "whole", 500)
    assert _checksums(resumed) == _checksums(whole.directory)


def test_item05_prepare_dedup_drops_the_same_rows_as_the_in_ram_path(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    rows = make_rows(200)
    rng = np.random.default_rng(1)
    rows += [rows[i] for i in rng.integers(0, 200, size=150)]  # repeats across batches
    rng.shuffle(rows)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    config = _config(tmp_path, train, tokenizer_dir, val_split=0.0)
    prepared = _prepare_direct(config, "cache", batch_rows=32)
    data = assemble_data(load_config(str(config)), Given())
    assert prepared.stats["dropped"] == data.stats["dropped"]
    assert prepared.stats["dropped"]["duplicate"] > 100
    shards = ShardSet.open(prepared.directory)
    assert len(data.train) == len(shards)
    assert all(
        data.train[i]["input_ids"].tolist() == shards.doc(i).tolist() for i in range(len(shards))
    )


def test_item02_dedup_spilled_to_sorted_runs_keeps_the_same_documents(
    tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = make_rows(300)
    rng = np.random.default_rng(2)
    rows += [rows[i] for i in rng.integers(0, 300, size=200)]  # repeats, near and far
    rng.shuffle(rows)
    config = _config(tmp_path, write_jsonl(tmp_path / "train.jsonl", rows), tokenizer_dir)
    in_memory = _prepare_direct(config, "memory", batch_rows=32)
    spills: list[int] = []
    real = dedup.DigestSet._spill_table

    def spill(self: dedup.DigestSet) -> None:
        real(self)
        on_disk = list((tmp_path / "spilled").glob(f"shards-*/{DEDUP_RUNS}/run-*.bin"))
        assert len(on_disk) == self.runs
        spills.append(self.runs)

    monkeypatch.setattr(dedup, "MEMORY_KEYS", 20)  # a table of 20 digests: ~14 spills
    monkeypatch.setattr(dedup.DigestSet, "_spill_table", spill)
    spilled = _prepare_direct(config, "spilled", batch_rows=32)
    assert len(spills) >= 10
    assert max(spills) < len(spills)  # runs were merged
    assert spilled.stats == in_memory.stats
    assert spilled.stats["dropped"]["duplicate"] > 150
    assert _checksums(spilled.directory) == _checksums(in_memory.directory)
    assert not (spilled.directory / DEDUP_RUNS).exists()  # the runs go with the set complete
