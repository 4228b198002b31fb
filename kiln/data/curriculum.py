"""Curriculum learning: which training samples may be drawn, as training goes on.

A curriculum gives every training example a difficulty and (optionally) a quality score, and
turns the time of training, t (the epoch, or the optimizer step: `data.curriculum.by`), into an
eligibility mask over the examples:

- **stages** (`data.curriculum.stages`, easiest first): at time t the stage is the first one
  with `t < until` (the last one has no `until`); only examples with difficulty <=
  `max_difficulty` are eligible (all of them when it is null). E.g. difficulty <= 2 in epoch 0,
  <= 3 in epoch 1, everything after.
- **progressive quality** (`data.curriculum.quality`): examples scoring below the threshold
  `start + (end - start) * min(t, over) / over` on `data.quality_field` are not eligible, so the
  bar rises from e.g. 0.5 to 0.75 over training.

The sampler (`BatchCursor.next_indices(eligible=...)`) walks the seeded epoch permutation and
takes the next eligible examples, skipping the others. Eligibility is a pure function of
(epoch, step) and the cursor is a position in that permutation, so a resumed run draws exactly
the batches an uninterrupted one draws: no curriculum state beyond the cursor is needed.

Difficulty (`data.curriculum.difficulty`) is a numeric row field (`difficulty` in the recipe
data), `length` (the sample's input tokens; for packed blocks, a document's tokens) or
`num_steps` (lines of the rendered text that start with a step number such as `3.` or `3)`).
A packed block holds several documents: its difficulty is the largest of theirs and its
quality the smallest, and `order_rows` sorts the training rows by (difficulty, quality) before
packing, so a block holds documents of the same level.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from kiln.data.sources import _Problems, json_type, where
from kiln.data.tasks import make_format, render_rows
from kiln.errors import DataError

if TYPE_CHECKING:
    from kiln.config import CurriculumConfig, CurriculumStage, RunConfig
    from kiln.data.dataset import TokenDataset

__all__ = ["Curriculum", "order_rows", "row_values"]

log = logging.getLogger("kiln")

_STEP_LINE = re.compile(r"^\s*\d+[.)]\s", re.MULTILINE)

COMPUTED = ("length", "num_steps")
"""Difficulty sources computed from the sample rather than read from a row field."""


def _number(row: Mapping[str, Any], index: int, name: str, key: str) -> tuple[float, str | None]:
    """The row's numeric field `name` (a number or numeric string), or a problem line."""
    if name not in row:
        return 0.0, f"{where(row, index)}: missing field '{name}' (needed by {key})"
    value = row[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond the float range (JSON allows any length)
            number = float("inf")
    else:
        try:
            number = float(value) if isinstance(value, str) else float("nan")
        except ValueError:
            number = float("nan")
        if number != number:  # not a number at all
            got = f"string {value!r}" if isinstance(value, str) else json_type(value)
            return 0.0, f"{where(row, index)}: field '{name}' must be a number, got {got}"
    if not np.isfinite(number):
        # Such an int may have thousands of digits (or too many for str()): not in a message.
        got = "an integer beyond the float range" if isinstance(value, int) else value
        return 0.0, f"{where(row, index)}: field '{name}' must be finite, got {got}"
    return number, None


def _field_values(rows: Sequence[Mapping[str, Any]], name: str, key: str) -> Tensor:
    problems = _Problems()
    values = []
    for i, row in enumerate(rows):
        number, problem = _number(row, i, name, key)
        if problem is not None:
            problems.add(problem)
        values.append(number)
    problems.raise_if_any()
    return torch.tensor(values, dtype=torch.float64)


def row_values(
    cfg: RunConfig,
    rows: Sequence[Mapping[str, Any]],
    rendered: Sequence[tuple[str, ...]] | None = None,
) -> dict[str, Tensor]:
    """Per-row curriculum values: `difficulty` and/or `quality`, (len(rows),) float64.
    `rendered`: the rows' renderings with the task's template, when the caller has them.

    `length` difficulty is counted in characters of the rendered text here (`Curriculum`
    replaces it by tokens per example). Rows missing a needed field, or holding a value that
    is not a finite number, raise one DataError naming each `file:line`.
    """
    cur = cfg.data.curriculum
    assert cur is not None
    out: dict[str, Tensor] = {}
    if cur.stages:
        if cur.difficulty in COMPUTED:
            if rendered is None:
                rendered = render_rows(make_format(cfg), rows)
            if cur.difficulty == "length":
                counts = [sum(len(p) for p in parts) for parts in rendered]
            else:
                counts = [len(_STEP_LINE.findall("\n".join(parts))) for parts in rendered]
            out["difficulty"] = torch.tensor(counts, dtype=torch.float64)
        else:
            out["difficulty"] = _field_values(rows, cur.difficulty, "data.curriculum.difficulty")
    if cur.quality is not None:
        out["quality"] = _field_values(
            rows, cfg.data.quality_field, "data.curriculum.quality (data.quality_field)"
        )
    return out


def order_rows(cfg: RunConfig, rows: list[Any]) -> list[Any]:
    """Training rows sorted by (difficulty, quality), stably, when a curriculum packs them.

    Only with `data.curriculum` and packed causal_lm data: packing puts neighbouring rows in
    one block, so sorting first makes each block hold documents of one level. Otherwise the
    rows are returned as they are (the sampler shuffles them anyway).
    """
    if cfg.data.curriculum is None or not (cfg.task == "causal_lm" and cfg.data.packing):
        return rows
    values = row_values(cfg, rows)
    zeros = torch.zeros(len(rows), dtype=torch.float64)
    difficulty = values.get("difficulty", zeros).tolist()
    quality = values.get("quality", zeros).tolist()
    order = sorted(range(len(rows)), key=lambda i: (difficulty[i], -quality[i]))
    return [rows[i] for i in order]


def _block_reduce(dataset: TokenDataset, per_doc: Tensor, largest: bool) -> Tensor:
    """Per-block max (or min) of the values of the documents each packed block holds."""
    starts = dataset.doc_starts
    blocks = dataset.blocks
    assert blocks is not None
    if starts is None:
        raise DataError(
            "data.curriculum: packed blocks without document boundaries; "
            "set data.isolate_documents: true"
        )
    n, length = blocks.shape
    per_doc = per_doc[: len(starts)]  # documents past the last full block were cut
    first = torch.arange(n, dtype=torch.int64) * length
    lo = torch.searchsorted(starts, first, right=True) - 1  # document at each block start
    hi = torch.searchsorted(starts, first + length - 1, right=True) - 1  # ... at its end
    lo = lo.clamp(min=0)  # a stream always starts with a document
    values = per_doc.numpy()
    ufunc = np.maximum if largest else np.minimum
    # reduceat covers lo[b] .. lo[b + 1] - 1; the document that runs on into the next block
    # (hi[b] == lo[b + 1]) is added separately.
    reduced = ufunc.reduceat(values, lo.numpy())
    return torch.from_numpy(ufunc(reduced, values[hi.numpy()]))


class Curriculum:
    """Eligibility of training examples over time; see the module docstring.

    Args:
        cfg: the curriculum section (`data.curriculum`).
        difficulty: (N,) difficulty per example, or None without stages.
        quality: (N,) quality per example, or None without a quality ramp.
    """

    def __init__(
        self, cfg: CurriculumConfig, difficulty: Tensor | None, quality: Tensor | None
    ) -> None:
        self.cfg = cfg
        self.difficulty = difficulty
        self.quality = quality
        self._cached: tuple[Any, Tensor] | None = None
        self._logged: Any = None

    @classmethod
    def for_dataset(
        cls,
        cfg: RunConfig,
        dataset: TokenDataset,
        rows: Sequence[Mapping[str, Any]] | None,
        values: Mapping[str, Tensor] | None = None,
    ) -> Curriculum:
        """The curriculum of `cfg.data.curriculum` over the examples of `dataset`.

        `rows` are the training rows `dataset` was tokenized from, in order (None when the
        data was given as tokens: then only `length` difficulty works). `values` replace them
        where there are no rows (token shards): `row_values` of each example's row (ragged),
        or of each document of the packed stream, in order.

        Raises:
            DataError: rows without the fields the curriculum reads (named `file:line`), or
                no rows for a field-based curriculum.
        """
        cur = cfg.data.curriculum
        assert cur is not None
        needs_rows = cur.quality is not None or (cur.stages and cur.difficulty != "length")
        by_row = values is None  # values given: one per example (or packed document) already
        if values is None and rows is None and needs_rows:
            raise DataError(
                "data.curriculum: needs the training rows (their fields); training data "
                "given as tokens only supports difficulty: length without a quality ramp"
            )
        if values is None:
            values = row_values(cfg, rows) if rows is not None else {}

        def of_examples(per_row: Tensor) -> Tensor:
            return per_row[dataset.source_rows] if by_row else per_row

        packed = dataset.blocks is not None
        difficulty = None
        if cur.stages:
            if cur.difficulty == "length" and packed:
                starts = dataset.doc_starts
                assert starts is not None
                ends = torch.cat([starts[1:], torch.tensor([dataset.blocks.numel()])])
                difficulty = _block_reduce(dataset, (ends - starts).double(), largest=True)
            elif cur.difficulty == "length":
                difficulty = dataset.lengths.double()
            elif packed:
                difficulty = _block_reduce(dataset, values["difficulty"], largest=True)
            else:
                difficulty = of_examples(values["difficulty"])
        quality = None
        if cur.quality is not None:
            if packed:
                quality = _block_reduce(dataset, values["quality"], largest=False)
            else:
                quality = of_examples(values["quality"])
        return cls(cur, difficulty, quality)

    def time(self, epoch: int, step: int) -> int:
        """The curriculum's clock: the epoch or the optimizer step (`curriculum.by`)."""
        return epoch if self.cfg.by == "epoch" else step

    def stage(self, t: int) -> tuple[int, CurriculumStage | None]:
        """(index, stage) in force at time t; (-1, None) without stages."""
        for i, stage in enumerate(self.cfg.stages):
            if stage.until is None or t < stage.until:
                return i, stage
        return -1, None  # unreachable: the last stage has until=None (config check)

    def threshold(self, t: int) -> float | None:
        """The quality threshold at time t, or None without a quality ramp."""
        ramp = self.cfg.quality
        if ramp is None:
            return None
        return ramp.start + (ramp.end - ramp.start) * min(t, ramp.over) / ramp.over

    def mask(self, epoch: int, step: int) -> Tensor:
        """(N,) bool: the examples that may be drawn at (epoch, step)."""
        t = self.time(epoch, step)
        index, stage = self.stage(t)
        limit = stage.max_difficulty if stage is not None else None
        threshold = self.threshold(t)
        key = (limit, threshold)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        n = len(self.difficulty if self.difficulty is not None else self.quality)
        keep = torch.ones(n, dtype=torch.bool)
        if limit is not None and self.difficulty is not None:
            keep &= self.difficulty <= limit
        if threshold is not None and self.quality is not None:
            keep &= self.quality >= threshold
        self._cached = (key, keep)
        if (index, limit) != self._logged:
            self._logged = (index, limit)
            log.info("curriculum: %s", self.describe(epoch, step))
        return keep

    def describe(self, epoch: int, step: int) -> str:
        """One line: the stage, the quality threshold and how many examples are eligible."""
        t = self.time(epoch, step)
        index, stage = self.stage(t)
        parts = [f"{self.cfg.by} {t}"]
        if stage is not None:
            limit = "all" if stage.max_difficulty is None else f"<= {stage.max_difficulty:g}"
            parts.append(f"stage {index + 1}/{len(self.cfg.stages)} (difficulty {limit})")
        threshold = self.threshold(t)
        if threshold is not None:
            parts.append(f"quality >= {threshold:.3f}")
        keep = self._cached[1] if self._cached is not None else None
        if keep is not None:
            parts.append(f"{int(keep.sum())} of {len(keep)} examples eligible")
        return ", ".join(parts)

    def epoch_batches(self, epoch: int, global_batch: int) -> int:
        """Full batches in `epoch` (curriculum by epoch: the mask is fixed within an epoch)."""
        return int(self.mask(epoch, 0).sum()) // global_batch

    def total_micro_batches(self, num_epochs: float, global_batch: int) -> int:
        """Micro-batches in `num_epochs` epochs (by epoch): the full ones, then a fraction."""
        full = int(num_epochs)
        total = sum(self.epoch_batches(e, global_batch) for e in range(full))
        frac = num_epochs - full
        if frac > 0:
            total += int(frac * self.epoch_batches(full, global_batch))
        return total
