"""Curriculum learning on token shards (issue 28, item 3): the values the curriculum reads from
the rows are read once per set (document i is kept row i) and kept beside it; a run on shards
draws the same examples at every step as in memory, and trains the same weights, bit for bit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kiln import Trainer
from kiln.config import load_config
from kiln.config.base import ConfigError
from kiln.data.assemble import Given, assemble_data
from kiln.errors import DataError
from tests.helpers import assert_resume_is_exact, make_rows, tiny_raw, train_corpus, write_jsonl

STAGES = [{"until": 1, "max_difficulty": 2}, {"until": 2, "max_difficulty": 4}, {}]
QUALITY = {"start": 0.2, "end": 0.6, "over": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    rows = make_rows(240)
    for row in rows[::3]:  # 4 steps instead of 3: a num_steps difficulty that varies
        row["text"] += "\n4. Serve."
    rows += rows[:3]  # duplicates: dropped by both paths, so document i is not row i of the file
    return train_corpus(tmp_path_factory.mktemp("shard-curriculum"), rows)


def _raw(tmp: Path, corpus: tuple[Path, Path], storage: str, curriculum: dict, **data: Any):
    train, tok = corpus
    return tiny_raw(
        tmp,
        train,
        None,
        tokenizer={"name_or_path": str(tok)},
        model={"max_position_embeddings": 128},
        data={
            "val_split": 0.1,
            "storage": storage,
            "shard_tokens": 2000,
            "cache_dir": str(tmp.parent / "cache"),  # one set for the module's runs
            "curriculum": curriculum,
            **data,
        },
        eval={"every_steps": 5},
        train={"max_steps": 10, "batch_size": 4},
    )


CASES = {
    "packed-field-and-quality": ({"stages": STAGES, "quality": QUALITY}, {}),
    "packed-length": (
        {"difficulty": "length", "stages": [{"until": 1, "max_difficulty": 77}, {}]},
        {},
    ),
    "unpacked-length": (  # no values to read: the examples' token counts
        {"difficulty": "length", "stages": [{"until": 1, "max_difficulty": 75}, {}]},
        {"packing": False, "max_length": 128},
    ),
    "unpacked-steps-by-step": (
        {
            "difficulty": "num_steps",
            "by": "step",
            "stages": [{"until": 4, "max_difficulty": 3}, {}],
        },
        {"packing": False},
    ),
    "unpacked-quality": ({"quality": QUALITY}, {"packing": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_curriculum_on_shards_is_the_one_in_memory(
    tmp_path: Path, corpus: tuple[Path, Path], case: str
) -> None:
    curriculum, data = CASES[case]
    got = {}
    for storage in ("memory", "shards"):
        raw = _raw(tmp_path / storage, corpus, storage, curriculum, **data)
        got[storage] = assemble_data(load_config(data=raw), Given())
    mem, sh = got["memory"], got["shards"]
    assert type(sh.train).__name__ == "ShardDataset"
    assert len(mem.train) == len(sh.train)
    idx = torch.arange(len(mem.train))
    if mem.train.blocks is not None:  # packed in the curriculum's order: the same blocks
        assert torch.equal(mem.train.blocks[idx], sh.train.blocks[idx])
    else:
        assert all(torch.equal(mem.train[i]["input_ids"], sh.train[i]["input_ids"]) for i in idx)
    a, b = mem.curriculum, sh.curriculum
    for name in ("difficulty", "quality"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y), name
    masks = [a.mask(e, s) for e, s in ((0, 0), (0, 5), (1, 2), (2, 9), (5, 20))]
    assert any(not m.all() for m in masks)  # the curriculum does hold examples back
    for (e, s), m in zip(((0, 0), (0, 5), (1, 2), (2, 9), (5, 20)), masks, strict=True):
        assert torch.equal(m, b.mask(e, s))


def test_training_with_a_curriculum_on_shards_is_bit_for_bit_the_memory_run(
    tmp_path: Path, corpus: tuple[Path, Path]
) -> None:
    curriculum = {"stages": STAGES, "quality": QUALITY, "by": "step"}
    runs = {}
    for storage in ("memory", "shards"):
        raw = _raw(tmp_path / storage, corpus, storage, curriculum)
        raw["train"]["max_steps"] = 8
        raw["data"]["curriculum"]["stages"] = [{"until": 3, "max_difficulty": 2}, {}]
        trainer = Trainer(load_config(data=raw))
        runs[storage] = (trainer, trainer.fit())
    (mem, mem_result), (sh, sh_result) = runs["memory"], runs["shards"]
    assert sh_result.loss_history == mem_result.loss_history
    assert sh_result.metrics == mem_result.metrics
    for name, tensor in mem.model.state_dict().items():
        assert torch.equal(tensor, sh.model.state_dict()[name]), name


def test_a_curriculum_run_on_shards_resumes_exactly(
    tmp_path: Path, corpus: tuple[Path, Path]
) -> None:
    def make(root: Path) -> Any:
        raw = _raw(root, corpus, "shards", {"stages": STAGES, "quality": QUALITY})
        raw["data"]["max_samples"] = 60  # short epochs: the stages change during the run
        raw["checkpoint"] = {"every_steps": 4, "resume": "auto"}
        return load_config(data=raw)

    assert_resume_is_exact(make, tmp_path, stop_at=6)


def test_the_values_are_read_once_and_kept_beside_the_set(
    tmp_path: Path, corpus: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    raw = _raw(tmp_path / "a", corpus, "shards", {"stages": STAGES, "quality": QUALITY})
    raw["data"]["cache_dir"] = str(tmp_path / "own-cache")
    with caplog.at_level(logging.INFO, logger="kiln"):
        first = assemble_data(load_config(data=raw), Given())
    assert "curriculum: reading the values" in caplog.text
    (directory,) = (tmp_path / "own-cache").glob("shards-*")
    files = sorted(p.name for p in directory.glob("values-*.npy"))
    assert [f.split("-")[1] for f in files] == ["difficulty", "quality"]
    difficulty = np.load(next(directory.glob("values-difficulty-*.npy")))
    assert difficulty.dtype == np.float64
    assert difficulty.tolist() == [float(r["difficulty"]) for r in make_rows(240)]  # no repeats
    assert difficulty.size == 240
    assert not (directory / ".dedup").exists()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kiln"):
        again = assemble_data(load_config(data=raw), Given())
    assert "curriculum: reading the values" not in caplog.text
    assert torch.equal(first.curriculum.quality, again.curriculum.quality)
    # Another field is another value file of the same set (the set is not prepared again).
    raw["data"]["curriculum"] = {"stages": STAGES, "difficulty": "num_steps"}
    assemble_data(load_config(data=raw), Given())
    assert len(list(directory.glob("values-difficulty-*.npy"))) == 2
    assert list((tmp_path / "own-cache").glob("shards-*")) == [directory]


def test_a_row_without_the_field_is_one_line_naming_it(tmp_path: Path, corpus: tuple) -> None:
    rows = make_rows(40)
    del rows[17]["difficulty"]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    raw = _raw(tmp_path / "run", (train, corpus[1]), "shards", {"stages": STAGES})
    with pytest.raises(DataError, match=r"train\.jsonl:18: missing field 'difficulty'"):
        assemble_data(load_config(data=raw), Given())


def test_what_does_not_combine_is_one_line(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    raw = _raw(tmp_path, corpus, "shards", {"stages": STAGES})
    raw["data"]["train"] = None
    raw["data"]["sources"] = [{"path": str(corpus[0]), "weight": 1.0}]
    with pytest.raises(ConfigError, match=r"data\.curriculum: not supported with data\.sources"):
        load_config(data=raw)
    raw = _raw(tmp_path, corpus, "shards", {"stages": STAGES}, loader_workers=1)
    with pytest.raises(ConfigError, match=r"data\.(curriculum|loader_workers)"):
        load_config(data=raw)


def test_kiln_data_prepare_reads_the_values_too(
    tmp_path: Path,
    corpus: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import yaml

    from kiln.cli import main

    raw = _raw(tmp_path / "run", corpus, "shards", {"stages": STAGES, "quality": QUALITY})
    raw["data"]["cache_dir"] = str(tmp_path / "own-cache")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["-q", "data", "prepare", str(config)]) == 0
    out = capsys.readouterr().out
    assert "curriculum values (difficulty, quality) of 240 documents: ready" in out
    (directory,) = (tmp_path / "own-cache").glob("shards-*")
    assert len(list(directory.glob("values-*.npy"))) == 2
    with caplog.at_level(logging.INFO, logger="kiln"):
        assemble_data(load_config(data=raw), Given())
    assert "curriculum: reading the values" not in caplog.text  # read back, not again
