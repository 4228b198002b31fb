"""Training from token shards (issue 28, `data.storage: shards`): the same examples, the same
batches and the same losses as the in-memory path, prepared on the first run, exact on resume,
one line for what does not combine or a damaged set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from kiln import Trainer
from kiln.cli import main
from kiln.config import load_config
from kiln.data import split_indices
from kiln.data.assemble import Given, assemble_data
from kiln.data.shards import MANIFEST
from kiln.data.shards.dataset import split_documents
from tests.helpers import (
    assert_resume_is_exact,
    logged_metrics,
    make_rows,
    tiny_raw,
    train_corpus,
    write_jsonl,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a training file, a saved tokenizer) shared by the module's tests."""
    rows = make_rows(300)
    rows += rows[:4]  # duplicates: dropped by both paths before the split
    return train_corpus(tmp_path_factory.mktemp("shard-train"), rows)


def _raw(tmp: Path, corpus: tuple[Path, Path], storage: str, **data: Any) -> dict[str, Any]:
    train, tok = corpus
    raw = tiny_raw(
        tmp,
        train,
        None,
        tokenizer={"name_or_path": str(tok)},
        data={"val_split": 0.2, "storage": storage, "shard_tokens": 3000, **data},
        eval={"every_steps": 6},
        train={"max_steps": 12},
    )
    return raw


def _both(tmp: Path, corpus: tuple[Path, Path], task: str = "causal_lm", **data: Any) -> tuple:
    out = []
    for storage in ("memory", "shards"):
        raw = _raw(tmp, corpus, storage, **data)
        raw["task"] = task
        out.append(assemble_data(load_config(data=raw), Given()))
    return tuple(out)


def _assert_same_examples(a: Any, b: Any) -> None:
    assert len(a) == len(b)
    assert a.num_tokens == b.num_tokens
    assert torch.equal(a.lengths, b.lengths)
    assert a.has_labels == b.has_labels
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), (i, key)
    if a.blocks is None:
        assert b.blocks is None
        return
    idx = torch.tensor([len(a) - 1, 0, 3, 3])
    assert torch.equal(a.blocks[idx], b.blocks[idx])
    if a.doc_starts is None:
        assert b.doc_starts is None
    else:
        assert torch.equal(a.doc_starts, b.doc_starts)
        assert torch.equal(a.block_position_ids(idx), b.block_position_ids(idx))


def test_split_documents_is_split_indices() -> None:
    for n, frac, seed in ((1, 0.0, 0), (10, 0.3, 1), (1000, 0.05, 42), (77, 0.5, 2**63)):
        train, val = split_documents(n, frac, seed)
        ref_train, ref_val = split_indices(n, frac, seed)
        assert train.tolist() == ref_train
        assert val.tolist() == ref_val
        assert train.dtype == val.dtype == np.int64


@pytest.mark.parametrize(
    "data",
    [{}, {"packing": False}, {"isolate_documents": False}, {"max_samples": 100}],
    ids=["packed", "unpacked", "packed-no-isolation", "max-samples"],
)
def test_every_causal_layout_gives_the_in_memory_examples(
    tmp_path: Path, corpus: tuple[Path, Path], data: dict[str, Any]
) -> None:
    mem, shards = _both(tmp_path, corpus, **data)
    assert type(shards.train).__name__ == "ShardDataset"
    _assert_same_examples(mem.train, shards.train)
    _assert_same_examples(mem.val, shards.val)
    for key in ("train_rows", "val_rows", "train_examples", "train_tokens", "val_tokens"):
        assert shards.stats[key] == mem.stats[key], key
    assert shards.stats["dropped"]["duplicate"] == mem.stats["dropped"]["duplicate"] == 4


def test_instruction_examples_and_labels_are_the_in_memory_ones(
    tmp_path: Path, corpus: tuple[Path, Path]
) -> None:
    rows = [{"prompt": f"Cook {r['title']}:", "response": r["text"]} for r in make_rows(60)]
    rows.insert(7, {"prompt": "x " * 200, "response": "y"})  # no room for a response token
    train = write_jsonl(tmp_path / "sft.jsonl", rows)
    mem, shards = _both(tmp_path, (train, corpus[1]), task="instruction", max_length=64)
    _assert_same_examples(mem.train, shards.train)
    _assert_same_examples(mem.val, shards.val)
    assert shards.train.aligned
    assert shards.stats["dropped"]["no_target"] == mem.stats["dropped"]["no_target"] == 1


def test_training_on_shards_is_training_in_memory_bit_for_bit(
    tmp_path: Path, corpus: tuple[Path, Path]
) -> None:
    results = {}
    for storage in ("memory", "shards"):
        trainer = Trainer(load_config(data=_raw(tmp_path / storage, corpus, storage)))
        result = trainer.fit()
        results[storage] = (trainer, result)
    (mem, mem_result), (sh, sh_result) = results["memory"], results["shards"]
    assert sh_result.loss_history == mem_result.loss_history
    assert sh_result.metrics == mem_result.metrics
    assert logged_metrics(sh_result.run_dir) == logged_metrics(mem_result.run_dir)
    for name, tensor in mem.model.state_dict().items():
        assert torch.equal(tensor, sh.model.state_dict()[name]), name
    stats = json.loads((sh_result.run_dir / "data_stats.json").read_text())
    assert stats["shards"].startswith(str(tmp_path / "shards" / "cache" / "shards-"))


def test_resume_from_shards_is_exact(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    def make(root: Path) -> Any:
        raw = _raw(root, corpus, "shards", cache_dir=str(tmp_path / "cache"))
        raw["checkpoint"] = {"every_steps": 5, "resume": "auto"}
        return load_config(data=raw)

    assert_resume_is_exact(make, tmp_path, stop_at=7)  # between two checkpoints


def _config_file(tmp: Path, corpus: tuple[Path, Path], **data: Any) -> Path:
    raw = _raw(tmp, corpus, "shards", **data)
    raw["train"]["max_steps"] = 3
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_kiln_train_prepares_the_shards_once(
    tmp_path: Path, corpus: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config_file(tmp_path, corpus)
    assert main(["-q", "train", str(config)]) == 0
    (directory,) = (tmp_path / "cache").glob("shards-*")
    manifest = (directory / MANIFEST).stat().st_mtime_ns
    capsys.readouterr()
    # `kiln data prepare` of the same config finds the set training made, and a second run
    # trains from it without writing it again.
    assert main(["data", "prepare", str(config)]) == 0
    assert capsys.readouterr().out.strip() == f"shards exist: {directory} (nothing to do)"
    assert main(["-q", "train", str(config), "output_dir=" + str(tmp_path / "again")]) == 0
    assert (directory / MANIFEST).stat().st_mtime_ns == manifest


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncate", "(truncated or altered); prepare the set again"),
        ("offsets", "(the file was altered); prepare the set again"),
    ],
)
def test_a_damaged_shard_set_is_one_line(
    tmp_path: Path,
    corpus: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    damage: str,
    expected: str,
) -> None:
    config = _config_file(tmp_path, corpus)
    assert main(["data", "prepare", str(config)]) == 0
    (directory,) = (tmp_path / "cache").glob("shards-*")
    capsys.readouterr()
    if damage == "truncate":
        victim = directory / "shard-00001.tokens"
        victim.write_bytes(victim.read_bytes()[:-2])
    else:  # same size, another document count: the offsets no longer match the manifest
        victim = directory / "shard-00000.offsets"
        raw = np.fromfile(victim, dtype="<i8")
        raw[1] = raw[2]
        raw.tofile(victim)
    assert main(["-q", "train", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(victim) in err or str(directory) in err
    assert expected in err or "prepare the set again" in err


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"augment": [{"name": "recipe_tip"}], "packing": False}, "data.augment"),
        ({"cache_dir": None}, "data.cache_dir"),
    ],
)
def test_what_does_not_combine_with_shards_is_one_line(
    tmp_path: Path,
    corpus: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    data: dict[str, Any],
    key: str,
) -> None:
    config = _config_file(tmp_path, corpus, **data)
    assert main(["-q", "train", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("kiln: error: ")
    assert f": {key}: " in err
    assert "data.storage: shards" in err


def test_data_given_to_the_trainer_is_refused_with_shards(
    tmp_path: Path, corpus: tuple[Path, Path]
) -> None:
    from kiln.errors import KilnError

    cfg = load_config(data=_raw(tmp_path, corpus, "shards"))
    with pytest.raises(KilnError, match="train_data was given to the Trainer"):
        assemble_data(cfg, Given(train_data=[[1, 2, 3]]))
