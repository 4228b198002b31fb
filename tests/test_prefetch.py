"""data.loader_workers (issue 28 item 3): DataLoader workers build the training batches ahead,
in the data cursor's order: the same batches, the same training bit for bit, exact on resume;
the workers end with the run; a curriculum is refused in one line."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln import Trainer
from kiln.config import ConfigError, load_config
from kiln.data import BatchCursor
from kiln.data.assemble import Given, assemble_data
from kiln.data.collate import Batcher
from kiln.data.prefetch import Prefetcher
from tests.helpers import (
    assert_resume_is_exact,
    logged_metrics,
    make_rows,
    tiny_raw,
    train_corpus,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_corpus(tmp_path_factory.mktemp("prefetch"), make_rows(160))


def _raw(tmp: Path, corpus: tuple[Path, Path], **data: Any) -> dict[str, Any]:
    train, tok = corpus
    return tiny_raw(
        tmp,
        train,
        None,
        tokenizer={"name_or_path": str(tok)},
        data={"val_split": 0.2, "shard_tokens": 2000, **data},
        eval={"every_steps": 5},
        train={"max_steps": 12, "grad_accum_steps": 2},
    )


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("storage", ["memory", "shards"])
def test_prefetched_batches_are_the_cursors_across_epochs_and_jumps(
    tmp_path: Path, corpus: tuple[Path, Path], storage: str
) -> None:
    data = assemble_data(load_config(data=_raw(tmp_path, corpus, storage=storage)), Given())
    batcher, train = Batcher("causal_lm", 0), data.train
    cursor = BatchCursor(len(train), 4, seed=3, epoch=1, cursor=8)  # mid-epoch
    prefetch = Prefetcher(batcher, lambda epoch: train, 2)
    try:
        draws = 3 * cursor.batches_per_epoch  # crosses two epoch ends
        for _ in range(draws):
            before = cursor.state_dict()
            idx = cursor.next_indices()
            _same(prefetch.take(cursor, before, idx), batcher(train, idx))
        assert prefetch.starts == 1
        cursor.load_state_dict({"epoch": 0, "cursor": 4})  # a rewind: the workers restart
        for _ in range(3):
            before = cursor.state_dict()
            idx = cursor.next_indices()
            _same(prefetch.take(cursor, before, idx), batcher(train, idx))
        assert prefetch.starts == 2
        cursor.next_indices()  # drawn without it (a curriculum step): it catches up
        before = cursor.state_dict()
        idx = cursor.next_indices()
        _same(prefetch.take(cursor, before, idx), batcher(train, idx))
        assert prefetch.starts == 3
        assert len(multiprocessing.active_children()) == 2
    finally:
        prefetch.close()
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize(
    "data",
    [{"storage": "shards"}, {"storage": "memory", "packing": False}],
    ids=["shards-packed", "memory-padded"],
)
def test_training_with_loader_workers_is_training_without_bit_for_bit(
    tmp_path: Path, corpus: tuple[Path, Path], data: dict[str, Any]
) -> None:
    runs = {}
    for workers in (0, 2):
        raw = _raw(tmp_path / f"w{workers}", corpus, loader_workers=workers, **data)
        raw["data"]["cache_dir"] = str(tmp_path / "cache")
        trainer = Trainer(load_config(data=raw))
        runs[workers] = (trainer, trainer.fit())
        assert multiprocessing.active_children() == []  # the workers ended with the run
    (plain, plain_result), (ahead, ahead_result) = runs[0], runs[2]
    assert ahead.prefetch is not None
    assert ahead.prefetch.starts == 1
    assert ahead_result.loss_history == plain_result.loss_history
    assert ahead_result.metrics == plain_result.metrics
    assert logged_metrics(ahead_result.run_dir) == logged_metrics(plain_result.run_dir)
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(tensor, ahead.model.state_dict()[name]), name


def test_augmented_batches_built_ahead_are_the_same(
    tmp_path: Path, corpus: tuple[Path, Path]
) -> None:
    """Augmentation re-tokenizes each drawn sample per (seed, epoch, sample): the workers do it
    for the epoch each batch is drawn from."""
    losses = []
    for workers in (0, 2):
        raw = _raw(tmp_path / f"w{workers}", corpus, loader_workers=workers, packing=False)
        raw["data"]["augment"] = [{"name": "recipe_tip", "p": 0.5}]
        raw["train"].update(max_steps=None, num_epochs=2, grad_accum_steps=1)
        losses.append(Trainer(load_config(data=raw)).fit().loss_history)
    assert losses[0] == losses[1]
    assert len(losses[0]) > 2 * 10  # (two epochs of ~128 samples in batches of 4)


def test_resume_with_loader_workers_is_exact(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    def make(root: Path) -> Any:
        raw = _raw(root, corpus, storage="shards", loader_workers=2)
        raw["data"]["cache_dir"] = str(tmp_path / "cache")
        raw["checkpoint"] = {"every_steps": 4, "resume": "auto"}
        return load_config(data=raw)

    assert_resume_is_exact(make, tmp_path, stop_at=6)  # between two checkpoints


def test_loader_workers_with_a_curriculum_is_one_line(tmp_path: Path) -> None:
    raw = tiny_raw(tmp_path, tmp_path / "x.jsonl", None)
    raw["data"].update(loader_workers=2, curriculum={"stages": [{"until": 1}, {}]})
    with pytest.raises(ConfigError) as refused:
        load_config(data=raw)
    assert [p for p in refused.value.problems if "loader_workers" in p] == [
        "data.loader_workers: not with data.curriculum (which samples may be drawn depends on "
        "the step, so batches cannot be built ahead); set data.loader_workers: 0"
    ]
