"""Curriculum learning: eligibility over time, the sampler walk, packing, exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_resume_is_exact, make_rows, tiny_config, write_jsonl

from kiln import Callback, Trainer
from kiln.config import ConfigError, load_config
from kiln.data import BatchCursor, TokenDataset
from kiln.data.curriculum import Curriculum, _block_reduce, order_rows
from kiln.errors import DataError


def _cfg(tmp_path: Path, curriculum: dict[str, Any], **sections: Any):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(60, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", make_rows(8, seed=2))
    data = {"curriculum": curriculum, **sections.pop("data", {})}
    return tiny_config(tmp_path, train, val, data=data, **sections)


def _curriculum(stages=(), quality=None, by="epoch") -> Any:
    raw = {
        "model": {"arch": "gpt2"},
        "data": {"train": "x.jsonl", "curriculum": {"by": by, "stages": list(stages)}},
        "train": {"max_steps": 10},
    }
    if quality:
        raw["data"]["curriculum"]["quality"] = quality
    return load_config(data=raw).data.curriculum


def test_stages_and_quality_ramp_give_the_documented_masks() -> None:
    cfg = _curriculum(
        stages=[{"until": 2, "max_difficulty": 1}, {"until": 4, "max_difficulty": 2}, {}],
        quality={"start": 0.5, "end": 0.7, "over": 4},
    )
    difficulty = torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    quality = torch.tensor([0.9, 0.9, 0.9, 0.55, 0.65, 0.75], dtype=torch.float64)
    cur = Curriculum(cfg, difficulty, quality)
    assert cur.threshold(0) == 0.5
    assert cur.threshold(2) == pytest.approx(0.6)
    assert cur.threshold(9) == pytest.approx(0.7)
    expect = {
        0: [1, 0, 0, 1, 0, 0],  # difficulty <= 1, quality >= 0.5
        1: [1, 0, 0, 1, 0, 0],  # quality >= 0.55
        2: [1, 1, 0, 0, 1, 0],  # difficulty <= 2, quality >= 0.6
        3: [1, 1, 0, 0, 1, 0],  # quality >= 0.65
        4: [1, 1, 1, 0, 0, 1],  # everything, quality >= 0.7
    }
    for epoch, want in expect.items():
        assert cur.mask(epoch, step=999).tolist() == [bool(x) for x in want], epoch


def test_step_curriculum_follows_the_step_not_the_epoch() -> None:
    cfg = _curriculum(stages=[{"until": 5, "max_difficulty": 1}, {}], by="step")
    cur = Curriculum(cfg, torch.tensor([1.0, 2.0], dtype=torch.float64), None)
    assert cur.mask(epoch=9, step=4).tolist() == [True, False]
    assert cur.mask(epoch=0, step=5).tolist() == [True, True]


def test_cursor_takes_only_eligible_samples_each_once_per_epoch() -> None:
    n, batch = 50, 4
    mask = torch.arange(n) % 3 == 0  # 17 eligible: 4 batches per epoch, 1 left out
    cursor = BatchCursor(n, batch, seed=3)
    seen: list[int] = []
    for _ in range(4):
        idx = cursor.next_indices(lambda epoch: mask)
        assert bool(mask[idx].all())
        seen += idx.tolist()
    assert len(set(seen)) == 16
    assert (cursor.epoch, cursor.cursor) == (1, 0)  # the epoch ended with the last full batch
    # Same order as the plain permutation with the ineligible samples skipped.
    from kiln.data.sampler import epoch_permutation

    perm = epoch_permutation(n, 3, 0)
    assert seen == [i for i in perm.tolist() if mask[i]][:16]


def test_cursor_resumes_mid_epoch_to_the_same_batches() -> None:
    mask = torch.arange(40) % 2 == 0
    straight = BatchCursor(40, 3, seed=1)
    ref = [straight.next_indices(lambda e: mask).tolist() for _ in range(9)]
    cut = BatchCursor(40, 3, seed=1)
    first = [cut.next_indices(lambda e: mask).tolist() for _ in range(4)]
    resumed = BatchCursor(40, 3, seed=1, **cut.state_dict())
    rest = [resumed.next_indices(lambda e: mask).tolist() for _ in range(5)]
    assert first + rest == ref


def test_too_few_eligible_samples_is_a_clear_error() -> None:
    mask = torch.zeros(20, dtype=torch.bool)
    mask[:3] = True
    with pytest.raises(DataError, match=r"only 3 of 20 training examples are eligible"):
        BatchCursor(20, 4, seed=0).next_indices(lambda e: mask)


def test_block_values_reduce_over_the_documents_each_block_holds() -> None:
    # Documents of lengths 5, 2, 9, 3, 6 (25 tokens) in blocks of 4: 6 blocks, 1 token cut.
    lengths = [5, 2, 9, 3, 6]
    starts = torch.tensor([0, 5, 7, 16, 19])
    ds = TokenDataset(torch.zeros(6, 4, dtype=torch.int64), doc_starts=starts)
    values = torch.tensor([1.0, 4.0, 2.0, 5.0, 3.0], dtype=torch.float64)
    got_max = _block_reduce(ds, values, largest=True).tolist()
    got_min = _block_reduce(ds, values, largest=False).tolist()
    doc_of_token = [d for d, n in enumerate(lengths) for _ in range(n)][:24]
    for b in range(6):
        docs = {doc_of_token[t] for t in range(4 * b, 4 * b + 4)}
        assert got_max[b] == max(values[d].item() for d in docs), b
        assert got_min[b] == min(values[d].item() for d in docs), b


def test_missing_difficulty_field_names_the_row(tmp_path: Path) -> None:
    rows = make_rows(12, seed=1)
    del rows[4]["difficulty"]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = tiny_config(tmp_path, train, None, data={"curriculum": {"stages": [{"until": 1}, {}]}})
    with pytest.raises(DataError, match=r"t\.jsonl:5: missing field 'difficulty'"):
        Trainer(cfg).setup()


def test_config_checks() -> None:
    base = {"model": {"arch": "gpt2"}, "data": {"train": "x.jsonl"}, "train": {"max_steps": 5}}
    for curriculum, match in [
        ({}, "set stages, quality, or both"),
        ({"stages": [{"until": 2}]}, "last stage must have until: null"),
        ({"stages": [{"until": 3}, {"until": 2}, {}]}, "must increase"),
    ]:
        raw = {**base, "data": {"train": "x.jsonl", "curriculum": curriculum}}
        with pytest.raises(ConfigError, match=match):
            load_config(data=raw)
    raw = {
        **base,
        "data": {"train": "x.jsonl", "curriculum": {"by": "step", "stages": [{}]}},
        "train": {"num_epochs": 2},
    }
    with pytest.raises(ConfigError, match=r"by: step needs train\.max_steps"):
        load_config(data=raw)


class Drawn(Callback):
    """Records the difficulty of every example drawn, per epoch (it spies on the trainer's
    batch cursor, so it holds the trainer itself: a test's privilege, not a callback's)."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, set[float]] = {}
        self.trainer: Trainer | None = None

    def on_step_begin(self, run: object) -> None:
        trainer = self.trainer
        assert trainer is not None
        assert trainer.cursor is not None
        real = trainer.cursor.next_indices

        def spy(eligible=None):
            idx = real(eligible)
            values = trainer.curriculum.difficulty[idx].tolist()
            self.by_epoch.setdefault(trainer.cursor.last_epoch, set()).update(values)
            return idx

        trainer.cursor.next_indices = spy


@pytest.mark.parametrize("packing", [False, True])
def test_staged_run_draws_easy_examples_first(tmp_path: Path, packing: bool) -> None:
    stages = [{"until": 1, "max_difficulty": 2}, {"until": 2, "max_difficulty": 3}, {}]
    cfg = _cfg(
        tmp_path,
        {"stages": stages},
        data={"packing": packing, "max_length": 48},
        train={"max_steps": None, "num_epochs": 3, "batch_size": 2},
    )
    drawn = Drawn()
    trainer = drawn.trainer = Trainer(cfg, callbacks=[drawn])
    result = trainer.fit()
    assert max(drawn.by_epoch[0]) <= 2
    assert max(drawn.by_epoch[1]) <= 3
    assert max(drawn.by_epoch[2]) == 5
    # Epoch lengths follow the eligible counts, and total steps add them up.
    diff = trainer.curriculum.difficulty
    per_epoch = [int((diff <= lim).sum()) // 2 for lim in (2, 3, 99)]
    assert trainer.state.total_steps == sum(per_epoch) == len(result.loss_history)


def test_order_rows_sorts_only_for_packed_curricula(tmp_path: Path) -> None:
    rows = make_rows(20, seed=1)
    cfg = _cfg(tmp_path, {"stages": [{"until": 1, "max_difficulty": 2}, {}]})
    ordered = order_rows(cfg, rows)
    assert [r["difficulty"] for r in ordered] == sorted(r["difficulty"] for r in rows)
    unpacked = _cfg(tmp_path, {"stages": [{}]}, data={"packing": False})
    assert order_rows(unpacked, rows) is rows


@pytest.mark.parametrize(
    ("curriculum", "stop_at"),
    [
        ({"by": "step", "stages": [{"until": 4, "max_difficulty": 2}, {}]}, 3),
        ({"by": "step", "quality": {"start": 0.2, "end": 0.6, "over": 6}}, 5),
        ({"by": "epoch", "stages": [{"until": 1, "max_difficulty": 1}, {}]}, 4),
    ],
)
def test_curriculum_run_resumes_bit_exactly(
    tmp_path: Path, curriculum: dict[str, Any], stop_at: int
) -> None:
    def make(root: Path):
        root.mkdir(parents=True, exist_ok=True)
        return _cfg(
            root,
            curriculum,
            model={"dropout": 0.1},
            data={"packing": False},
            train={"max_steps": 9, "batch_size": 3, "grad_accum_steps": 2},
            eval={"every_steps": 3},
            log={"every_steps": 2},
        )

    ref, resumed = assert_resume_is_exact(make, tmp_path, stop_at)
    assert resumed.state.epoch == ref.state.epoch
    assert resumed.state.cursor == ref.state.cursor
