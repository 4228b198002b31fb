"""How metric values read on the console and in the model card: a number format that stays
readable for huge perplexities, and the generation scores with the scale each is on.

BLEU is on sacrebleu's 0-100 scale; ROUGE F1 and the recipe scores are on 0-1. A line that
shows them side by side says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = [
    "LOSS_METRICS",
    "format_metric",
    "generation_scores",
    "metric_scale",
    "perplexity",
]

LOSS_METRICS = ("val_loss", "val_ppl", "val_accuracy", "val_tokens")
"""What every validation computes; the other `val_*` keys come from generation eval (or, for
preference pairs, are `kiln.config.run.PREFERENCE_VAL_METRICS`)."""
_GEN_BOOKKEEPING = ("val_gen_samples", "val_gen_samples_scored", "val_gen_time_s")
PPL_CAP_LOSS = 50.0
"""val_ppl is exp(loss) up to this loss (exp(50) ~ 5e21): a diverged loss gives a large
number, not an OverflowError."""
_LARGE = 1e6


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(50): the val_ppl kiln logs (a NaN loss gives NaN)."""
    return math.nan if math.isnan(loss) else math.exp(min(loss, PPL_CAP_LOSS))


def format_metric(value: float | None, digits: int = 4) -> str:
    """`value` with `digits` decimals, or in scientific notation from 1e6 on (a perplexity of
    an untrained model is ~1e15, unreadable as `2957745137753336.50`); None: "n/a"."""
    if value is None:
        return "n/a"
    if math.isfinite(value) and abs(value) >= _LARGE:
        return f"{value:.3e}"
    return f"{value:.{digits}f}"


def metric_scale(name: str) -> str | None:
    """The range of a generation score by name (with or without `val_`): "0-100" for BLEU,
    "0-1" for ROUGE and the recipe scores, None when kiln does not know (a user's metric)."""
    key = name.removeprefix("val_")
    if key == "bleu":
        return "0-100"
    if key.startswith(("rouge", "recipe_")):
        return "0-1"
    return None


def generation_scores(metrics: Mapping[str, float]) -> str:
    """The generation-eval scores of a validation's `metrics`, in order, each run of scores on
    one known scale followed by it: "bleu 12.34 (0-100)  rouge1 0.4120  rougeL 0.3000 (0-1)",
    and how many samples they cover when the time budget left some out ("(2 of 4 samples,
    time budget)"). Empty when the validation generated nothing."""
    parts: list[str] = []
    names = [k for k in metrics if k.startswith("val_")]
    from kiln.config.run import PREFERENCE_VAL_METRICS

    known = (*LOSS_METRICS, *PREFERENCE_VAL_METRICS, *_GEN_BOOKKEEPING)
    shown = [k for k in names if k not in known]
    for i, key in enumerate(shown):
        scale = metric_scale(key)
        digits = 2 if scale == "0-100" else 4
        text = f"{key.removeprefix('val_')} {format_metric(metrics[key], digits)}"
        following = metric_scale(shown[i + 1]) if i + 1 < len(shown) else None
        if scale is not None and scale != following:
            text += f" ({scale})"
        parts.append(text)
    scored, asked = metrics.get("val_gen_samples_scored"), metrics.get("val_gen_samples")
    if scored is not None and asked is not None and scored < asked:
        parts.append(f"({scored:.0f} of {asked:.0f} samples, time budget)")
    return "  ".join(parts)
