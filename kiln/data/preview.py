"""`kiln data preview`: what the model will be trained on, before any training.

Counts per stage and drop reason, token-length statistics, and a few rendered samples with the
part that carries no loss marked, built by the same code path as training.
"""

from __future__ import annotations

import statistics
from typing import Any

from kiln.config import RunConfig

__all__ = ["MASK_CLOSE", "MASK_OPEN", "preview", "render_example"]

MASK_OPEN, MASK_CLOSE = "⟦", "⟧"
_IGNORE = -100


def _lengths_table(name: str, lengths: list[int]) -> str:
    if not lengths:
        return f"{name:<18} (none)"
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    median = statistics.median(ordered)
    return (
        f"{name:<18} n={len(ordered):<7,} min={ordered[0]:<6} median={median:<8g} "
        f"p95={p95:<6} max={ordered[-1]:<6} total={sum(ordered):,}"
    )


def render_example(example: dict[str, Any], tokenizer: Any, task: str) -> str:
    """Decode one training example; tokens that carry no loss are wrapped in ⟦ ⟧.

    causal_lm: every token but the first is a target; instruction: the prompt is masked;
    seq2seq: the source is shown apart from the target.
    """
    ids = [int(x) for x in example["input_ids"]]
    if task == "seq2seq":
        source = tokenizer.decode(ids)
        target = tokenizer.decode([int(x) for x in example["labels"] if int(x) != _IGNORE])
        return f"source: {source}\ntarget: {target}"
    labels = [int(x) for x in example["labels"]] if "labels" in example else ids
    # The first token is never predicted (causal shift): show it masked too.
    masked = [i == 0 or lab == _IGNORE for i, lab in enumerate(labels)]
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or masked[i] != masked[start]:
            text = tokenizer.decode(ids[start:i])
            out.append(f"{MASK_OPEN}{text}{MASK_CLOSE}" if masked[start] else text)
            start = i
    return "".join(out)


def preview(cfg: RunConfig, *, samples: int = 3) -> str:
    """The preview report for a config, as text."""
    from kiln.data import build_datasets, load_splits, make_format, render_rows
    from kiln.data.tokenize import encode
    from kiln.models import build_tokenizer

    train_rows, val_rows, stats = load_splits(cfg)
    fmt = make_format(cfg)
    rendered = render_rows(fmt, train_rows)
    tokenizer = build_tokenizer(cfg, ["\n".join(parts) for parts in rendered])
    train, val, stats = build_datasets(cfg, tokenizer, train_rows, val_rows, stats=stats)
    counts = stats.to_dict()

    lines = [f"# data preview: {cfg.name} ({cfg.task})", "", "## rows"]
    lines.append(f"read               {counts.get('rows_read', 0):,}")
    for reason, n in sorted(counts.get("dropped", {}).items()):
        lines.append(f"dropped: {reason:<9} {n:,}")
    for key in ("bad_rows",):
        if counts.get(key):
            lines.append(
                f"skipped bad rows   {counts[key]:,}  e.g. {counts.get('bad_row_examples')}"
            )
    lines.append(f"train rows         {counts.get('train_rows', len(train_rows)):,}")
    lines.append(f"val rows           {counts.get('val_rows', len(val_rows)):,}")
    lines += ["", "## tokens"]
    for i, part in enumerate(fmt.parts):
        texts = [r[i] for r in rendered]
        lengths = [len(ids) for ids in encode(texts, tokenizer, what=f"counting {part} tokens")]
        lines.append(_lengths_table(f"{part} (per row)", lengths))
    lines.append(_lengths_table("train examples", [int(n) for n in train.lengths.tolist()]))
    if val is not None:
        lines.append(_lengths_table("val examples", [int(n) for n in val.lengths.tolist()]))
    lines.append(f"train target tokens {train.num_tokens:,} (the loss denominator over one epoch)")
    if cfg.task == "causal_lm" and cfg.data.packing:
        lines.append(f"packed into {len(train):,} blocks of {cfg.data.max_length} tokens")
    if cfg.data.curriculum is not None:
        lines += ["", "## curriculum", *_curriculum_lines(cfg, train, train_rows)]
    lines += [
        "",
        f"## samples (text in {MASK_OPEN} {MASK_CLOSE} carries no loss)",
    ]
    for i in range(min(samples, len(train))):
        lines += ["", f"--- train example {i} ---", render_example(train[i], tokenizer, cfg.task)]
    if cfg.data.augment:
        lines += ["", "## augmented (epoch 0)", *_augment_lines(cfg, train, train_rows, samples)]
    return "\n".join(lines)


def _curriculum_lines(cfg: RunConfig, train: Any, rows: list[Any]) -> list[str]:
    """Eligible examples at each point where the curriculum changes."""
    from kiln.data.curriculum import Curriculum

    cur = Curriculum.for_dataset(cfg, train, rows)
    times = {0} | {st.until for st in cur.cfg.stages if st.until is not None}
    if cur.cfg.quality is not None:
        times.add(cur.cfg.quality.over)
    lines = []
    for t in sorted(times):
        epoch, step = (t, 0) if cur.cfg.by == "epoch" else (0, t)
        cur.mask(epoch, step)
        lines.append(cur.describe(epoch, step))
    return lines


def _augment_lines(cfg: RunConfig, train: Any, rows: list[Any], samples: int) -> list[str]:
    """The first few training samples as the augmenters render them in epoch 0."""
    from kiln.data.augment import AugmentedDataset, build_augmenters
    from kiln.data.tasks import make_format

    fmt = make_format(cfg)
    augmenters = build_augmenters(cfg.data.augment, fmt)
    # Only the rendering is shown, so the tokenize callback is never called.
    aug = AugmentedDataset(train, rows, fmt, augmenters, lambda parts: train, cfg.seed)
    lines = []
    for i in range(min(samples, len(train))):
        parts = aug.sample(i, 0).parts
        lines += ["", f"--- train example {i}, augmented ---", "\n".join(parts)]
    return lines
