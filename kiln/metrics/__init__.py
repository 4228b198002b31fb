"""Evaluation metrics: BLEU and ROUGE (as sacrebleu and rouge-score compute them), recipe
scores, the metric registry for generation eval, the training throughput meter
(`ThroughputMeter`; the experiment trackers are `kiln.callbacks.loggers`), and how values read
on the console (`display`)."""

from kiln.metrics.display import format_metric, generation_scores, metric_scale
from kiln.metrics.recipe import recipe_metric, recipe_scores
from kiln.metrics.registry import (
    METRICS,
    GenSample,
    Metric,
    available_metrics,
    compute_metrics,
    get_metric,
    register_metric,
)
from kiln.metrics.text import bleu, rouge
from kiln.metrics.throughput import ThroughputMeter

__all__ = [
    "METRICS",
    "GenSample",
    "Metric",
    "ThroughputMeter",
    "available_metrics",
    "bleu",
    "compute_metrics",
    "format_metric",
    "generation_scores",
    "get_metric",
    "metric_scale",
    "recipe_metric",
    "recipe_scores",
    "register_metric",
    "rouge",
]
