"""seq2seq from token shards (issue 28, item 1): `kiln data prepare` stores each pair as one
document, the source's ids then the target's, with a label mask 0 on the source and 1 on the
target; a run on the set makes the in-memory path's examples, trains to the same losses and
weights bit for bit (validation included), resumes exactly (stopped, or SIGKILLed), and what
does not combine is one line."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from kiln import Trainer
from kiln.cli import main
from kiln.config import load_config
from kiln.data import split_indices
from kiln.data.assemble import Given, assemble_data
from kiln.data.shards import MANIFEST, ShardSet, ShardWriter
from kiln.data.shards.dataset import ShardDataset
from kiln.data.shards.prepare import _NOT_IN_KEY, STATS, shard_dir, shard_settings
from kiln.errors import DataError
from tests.helpers import (
    ROOT,
    assert_resume_is_exact,
    bpe_tokenizer,
    logged_metrics,
    make_rows,
    tiny_raw,
    write_jsonl,
)

SOURCE = "Title: {title}\nIngredients:\n{ingredients}"
TARGET = "{steps}"
# Sources are 24-39 tokens and targets 23-35 here (EOS aside): these limits cut some of each.
MAX_LENGTH, MAX_TARGET_LENGTH = 34, 28


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a training file, a saved tokenizer) shared by the module's tests."""
    root = tmp_path_factory.mktemp("shard-seq2seq")
    tok = root / "tok"
    bpe_tokenizer([r["text"] for r in make_rows(200)]).save_pretrained(tok)
    rows = make_rows(200)
    rows += rows[:4]  # duplicates: dropped by both paths before the split
    return write_jsonl(root / "train.jsonl", rows), tok


def _raw(tmp: Path, corpus: tuple[Path, Path], storage: str, **data: Any) -> dict[str, Any]:
    train, tok = corpus
    return tiny_raw(
        tmp,
        train,
        None,
        task="seq2seq",
        model={"arch": "t5", "num_layers": 1},  # a tiny T5 from transformers' T5Config
        tokenizer={"name_or_path": str(tok)},
        data={
            "val_split": 0.2,
            "storage": storage,
            "shard_tokens": 2000,  # several shards
            "source_template": SOURCE,
            "target_template": TARGET,
            "max_length": MAX_LENGTH,
            "max_target_length": MAX_TARGET_LENGTH,
            **data,
        },
        eval={"every_steps": 6},
        train={"max_steps": 12},
    )


def _both(tmp: Path, corpus: tuple[Path, Path], **data: Any) -> tuple[Any, Any]:
    mem, shards = (
        assemble_data(load_config(data=_raw(tmp, corpus, storage, **data)), Given())
        for storage in ("memory", "shards")
    )
    return mem, shards


def _assert_same_examples(a: Any, b: Any) -> None:
    assert len(a) == len(b) > 0
    assert a.num_tokens == b.num_tokens
    assert torch.equal(a.lengths, b.lengths)
    assert a.has_labels
    assert b.has_labels
    assert not a.aligned
    assert not b.aligned
    assert a.blocks is None
    assert b.blocks is None
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys() == {"input_ids", "labels"}
        for key in x:
            assert x[key].dtype == y[key].dtype == torch.int64
            assert torch.equal(x[key], y[key]), (i, key)


def _config_file(tmp: Path, corpus: tuple[Path, Path], **data: Any) -> Path:
    raw = _raw(tmp, corpus, "shards", **data)
    raw["train"]["max_steps"] = 3
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_prepare_stores_each_pair_as_source_then_target_with_a_mask(
    tmp_path: Path, corpus: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config_file(tmp_path, corpus)
    assert main(["data", "prepare", str(config)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("prepared 200 documents, "), out  # 204 rows, 4 duplicates
    (directory,) = (tmp_path / "cache").glob("shards-*")
    shards = ShardSet.open(directory, verify="full")
    assert shards.has_masks
    assert shards.num_shards > 2
    assert json.loads((directory / MANIFEST).read_text())["has_masks"] is True

    # The in-memory path of the same config: document d is the pair of kept row d, whatever
    # side of the split it falls on.
    mem = assemble_data(load_config(data=_raw(tmp_path / "m", corpus, "memory")), Given())
    train_idx, val_idx = split_indices(len(shards), 0.2, 0)
    cut_sources = cut_targets = 0
    for dataset, indices in ((mem.train, train_idx), (mem.val, val_idx)):
        assert len(dataset) == len(indices)
        for i, d in enumerate(indices):
            src, tgt = dataset[i]["input_ids"].tolist(), dataset[i]["labels"].tolist()
            mask = shards.mask(d)
            assert mask is not None
            assert shards.doc(d).tolist() == src + tgt
            assert mask.tolist() == [0] * len(src) + [1] * len(tgt)
            cut_sources += len(src) == MAX_LENGTH
            cut_targets += len(tgt) == MAX_TARGET_LENGTH
    assert 0 < cut_sources < 200
    assert 0 < cut_targets < 200
    stats = json.loads((directory / STATS).read_text())
    assert stats["dropped"] == mem.stats["dropped"]  # no "no_target": seq2seq drops no pair
    assert stats["documents"] == 200
    assert stats["tokens"] == shards.num_tokens


def test_the_limits_are_in_a_seq2seq_key_and_other_tasks_keys_did_not_change(
    tmp_path: Path, corpus: tuple[Path, Path]
) -> None:
    def settings(task: str, **data: Any) -> dict[str, Any]:
        raw = _raw(tmp_path, corpus, "shards", **data)
        raw["task"] = task
        if task != "seq2seq":
            raw["model"] = {"arch": "gpt2"}
        return shard_settings(load_config(data=raw), 2000)

    seq2seq = settings("seq2seq")["data"]
    assert (seq2seq["max_length"], seq2seq["max_target_length"]) == (34, 28)
    assert seq2seq["truncation"] is True
    assert settings("seq2seq", max_target_length=20) != settings("seq2seq")
    # causal_lm and instruction sets keep their keys (their sets stay valid): the settings
    # are what they were before seq2seq, and max_target_length is in neither.
    for task, shape in (("causal_lm", set()), ("instruction", {"max_length", "truncation"})):
        raw = _raw(tmp_path, corpus, "shards")
        raw["task"], raw["model"] = task, {"arch": "gpt2"}
        cfg = load_config(data=raw)
        before = cfg.data.model_dump(mode="json", exclude=set(_NOT_IN_KEY) - shape)
        assert shard_settings(cfg, 2000) == {"task": task, "data": before, "shard_tokens": 2000}
        assert settings(task, max_target_length=20) == settings(task)
    cfg = load_config(data=_raw(tmp_path, corpus, "shards"))
    instruction = cfg.replace(task="instruction", **{"model.arch": "gpt2"})
    assert shard_dir(cfg, [str(corpus[0])], None, 2000) != shard_dir(
        instruction, [str(corpus[0])], None, 2000
    )


@pytest.mark.parametrize(
    "data",
    [{}, {"max_samples": 100}, {"max_length": 8, "max_target_length": 6}, {"val_split": 0.0}],
    ids=["default", "max-samples", "tight-limits", "no-val"],
)
def test_seq2seq_examples_are_the_in_memory_ones(
    tmp_path: Path, corpus: tuple[Path, Path], data: dict[str, Any]
) -> None:
    mem, shards = _both(tmp_path, corpus, **data)
    assert type(shards.train).__name__ == "ShardDataset"
    _assert_same_examples(mem.train, shards.train)
    if mem.val is None:
        assert shards.val is None
    else:
        _assert_same_examples(mem.val, shards.val)
    for key in ("train_rows", "val_rows", "train_examples", "train_tokens", "val_tokens"):
        assert shards.stats.get(key) == mem.stats.get(key), key
    assert shards.stats["dropped"] == mem.stats["dropped"]


def test_too_long_pairs_without_truncation_are_refused_by_both_paths(
    tmp_path: Path, corpus: tuple[Path, Path]
) -> None:
    errors = []
    for storage in ("memory", "shards"):
        cfg = load_config(data=_raw(tmp_path / storage, corpus, storage, truncation=False))
        with pytest.raises(DataError) as info:
            assemble_data(cfg, Given())
        errors.append(str(info.value))
    for error in errors:
        assert "train.jsonl:" in error
        assert "exceed" in error
        assert "data.truncation: true" in error


@pytest.mark.parametrize(
    "data",
    [{}, {"group_by_length": True, "loader_workers": 1}],
    ids=["default", "grouped-prefetched"],
)
def test_training_seq2seq_on_shards_is_training_in_memory_bit_for_bit(
    tmp_path: Path, corpus: tuple[Path, Path], data: dict[str, Any]
) -> None:
    results = {}
    for storage in ("memory", "shards"):
        raw = _raw(tmp_path / storage, corpus, storage, **data)
        raw["train"]["grad_accum_steps"] = 2
        cfg = load_config(data=raw)
        assert cfg.data.packing  # the default: it does not apply to seq2seq, either way
        trainer = Trainer(cfg)
        results[storage] = (trainer, trainer.fit())
    (mem, mem_result), (sh, sh_result) = results["memory"], results["shards"]
    assert type(sh.train_data).__name__ == "ShardDataset"
    assert len(sh_result.loss_history) == 12
    assert sh_result.loss_history == mem_result.loss_history
    assert [m["step"] for m in sh_result.metrics] == [6, 12]  # validation on the held-out 20%
    assert sh_result.metrics == mem_result.metrics
    assert all(np.isfinite(m["val_loss"]) for m in sh_result.metrics)
    assert logged_metrics(sh_result.run_dir) == logged_metrics(mem_result.run_dir)
    for name, tensor in mem.model.state_dict().items():
        assert torch.equal(tensor, sh.model.state_dict()[name]), name
    stats = json.loads((sh_result.run_dir / "data_stats.json").read_text())
    assert stats["shards"].startswith(str(tmp_path / "shards" / "cache" / "shards-"))


def test_resume_from_seq2seq_shards_is_exact(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    def make(root: Path) -> Any:
        raw = _raw(root, corpus, "shards", cache_dir=str(tmp_path / "cache"))
        raw["checkpoint"] = {"every_steps": 5, "resume": "auto"}
        return load_config(data=raw)

    assert_resume_is_exact(make, tmp_path, stop_at=7)  # between two checkpoints


def _kill_config(tmp: Path, corpus: tuple[Path, Path], name: str, workers: int) -> Path:
    raw = _raw(tmp, corpus, "shards", cache_dir=str(tmp / f"cache-{name}"), loader_workers=workers)
    raw["output_dir"] = str(tmp / name)
    raw["train"] = {"max_steps": 30, "batch_size": 4, "grad_accum_steps": 2, "num_threads": 1}
    raw["eval"] = {"every_steps": 15, "max_batches": 2}
    raw["checkpoint"] = {"every_steps": 1, "keep_last": 2, "resume": "auto"}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "-q", "train", str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,  # a kill takes the run and its loader worker at once
    )


def _finish(config: Path) -> None:
    proc = _train(config)
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]


def _losses(run: Path) -> list[tuple[int, str, float]]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"]) for r in records]


@pytest.mark.slow
def test_sigkill_on_seq2seq_shards_then_resume_is_exact(
    tmp_path: Path, corpus: tuple[Path, Path]
) -> None:
    _finish(_kill_config(tmp_path, corpus, "ref", workers=0))
    config = _kill_config(tmp_path, corpus, "kill", workers=1)  # batches built ahead
    run, rng, kills = tmp_path / "kill", random.Random(28), 0
    for _ in range(2):
        proc = _train(config)
        if kills == 0:  # the first kill after the first checkpoint
            deadline = time.monotonic() + 240
            while not any((run / "checkpoints").glob("step-*")):
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 1.5))
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 1
    _finish(config)
    a = load_file(run / "final" / "model.safetensors")
    b = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[name], b[name]) for name in b)
    assert _losses(run) == _losses(tmp_path / "ref")
    assert any(split == "val" for _, split, _ in _losses(run))


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"augment": [{"name": "recipe_tip"}]}, "data.augment"),
        ({"cache_dir": None}, "data.cache_dir"),
    ],
)
def test_what_does_not_combine_with_seq2seq_shards_is_one_line(
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
    assert "task:" not in err  # seq2seq itself combines


def test_generation_metrics_need_data_val_on_seq2seq_shards(
    tmp_path: Path, corpus: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config_file(tmp_path, corpus)
    raw = yaml.safe_load(config.read_text())
    raw["eval"]["generate"] = {"num_samples": 2}
    config.write_text(yaml.safe_dump(raw))
    assert main(["-q", "train", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "eval.generate: with data.storage: shards, generation metrics need data.val" in err


def test_pairs_are_split_where_their_mask_turns_to_1_across_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(2, 50, 1 + i % 5), rng.integers(2, 50, 1 + i % 3)) for i in range(40)]
    with ShardWriter(tmp_path, 50, "k", None, shard_tokens=30, with_masks=True) as writer:
        for i, (src, tgt) in enumerate(pairs):
            writer.add(np.concatenate([src, tgt]), [0] * src.size + [1] * tgt.size)
            if i % 7 == 3:  # an empty document (a prepare never writes one for seq2seq)
                writer.add([], [])
    shards = ShardSet.open(tmp_path)
    assert shards.num_shards > 3
    lengths = shards.document_lengths()
    docs = np.flatnonzero(lengths > 0)[::-1].copy()  # any order: examples follow `docs`
    ds = ShardDataset.seq2seq(shards, docs, lengths)
    expected = pairs[::-1]
    assert len(ds) == 40
    for i, (src, tgt) in enumerate(expected):
        assert ds[i]["input_ids"].tolist() == src.tolist()
        assert ds[i]["labels"].tolist() == tgt.tolist()
    assert ds.lengths.tolist() == [src.size for src, _ in expected]
    assert ds.num_tokens == sum(tgt.size for _, tgt in expected)
    assert not ds.aligned


@pytest.mark.parametrize(
    "mask",
    [[0, 1, 0, 1], [0, 0, 1, 0, 1], [0, 0, 0], [1, 1, 1], []],
    ids=["1-in-source", "0-in-target", "no-target", "no-source", "empty"],
)
def test_a_mask_that_is_not_source_then_target_is_one_line(tmp_path: Path, mask: list[int]) -> None:
    with ShardWriter(tmp_path / "set", 50, "k", None, with_masks=True, durable=False) as writer:
        writer.add([5, 6, 1, 7, 1], [0, 0, 0, 1, 1])  # a pair: source 5 6 EOS, target 7 EOS
        writer.add(list(range(8, 8 + len(mask))), mask)
        writer.add([5, 1, 7, 1], [0, 0, 1, 1])
    shards = ShardSet.open(tmp_path / "set")
    lengths = shards.document_lengths()
    good = ShardDataset.seq2seq(shards, np.array([0, 2]), lengths)  # the bad one not selected
    assert good[0]["input_ids"].tolist() == [5, 6, 1]
    assert good[1]["labels"].tolist() == [7, 1]
    with pytest.raises(DataError, match=r"document 1 of .* is not a seq2seq pair") as info:
        ShardDataset.seq2seq(shards, np.array([0, 1, 2]), lengths, what="training data")
    assert len(str(info.value).splitlines()) == 1
    assert str(info.value).startswith("training data: ")


def test_a_set_without_masks_is_not_read_as_seq2seq(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, 50, "k", None, durable=False) as writer:
        writer.add([5, 6, 1])
    with pytest.raises(DataError, match="has no label masks"):
        ShardDataset.seq2seq(ShardSet.open(tmp_path), np.array([0]), np.array([3]))


def test_a_seq2seq_mixture_draws_the_pairs_each_source_makes_alone(
    tmp_path: Path, corpus: tuple[Path, Path]
) -> None:
    rows = [json.loads(x) for x in corpus[0].read_text().splitlines()]
    paths = [
        write_jsonl(tmp_path / "a.jsonl", rows[:120]),
        write_jsonl(tmp_path / "b.jsonl", rows[120:]),
    ]
    raw = _raw(tmp_path, corpus, "shards")
    del raw["data"]["train"]
    raw["data"]["sources"] = [
        {"path": str(paths[0]), "weight": 0.7},
        {"path": str(paths[1]), "weight": 0.3},
    ]
    mixture = assemble_data(load_config(data=raw), Given())
    train = mixture.train
    assert type(train).__name__ == "Mixture"
    assert train.has_labels
    assert not train.aligned
    assert train.num_tokens == sum(len(train[i]["labels"]) for i in range(len(train)))
    assert train.lengths.tolist() == [len(train[i]["input_ids"]) for i in range(len(train))]
    val_tokens = 0
    for k, path in enumerate(paths):  # each source's examples: those of a run on it alone
        alone = _raw(tmp_path / f"alone-{k}", corpus, "memory", train=str(path))
        mem = assemble_data(load_config(data=alone), Given())
        _assert_same_examples(mem.train, train.sources[k])
        val_tokens += mem.val.num_tokens
    assert mixture.val.num_tokens == val_tokens
