"""Generation metrics by name: a `Metric` is any callable from samples to named scores.

Add one in a few lines::

    from kiln.metrics import register_metric

    @register_metric("length")
    def length(samples):
        return {"gen_chars": sum(len(s.generation) for s in samples) / len(samples)}

then list it in `eval.generate.metrics: [bleu, rouge, length]`. A config may also name a
metric by import path, "package.module:function", which is imported when the run starts.
Scores are logged with a `val_` prefix (`val_bleu`, `val_recipe_format`, ...), so early
stopping and keep_best can rank by them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kiln.metrics.recipe import recipe_metric
from kiln.metrics.text import bleu, rouge
from kiln.registry import Registry, UnknownName

__all__ = [
    "METRICS",
    "GenSample",
    "Metric",
    "available_metrics",
    "compute_metrics",
    "get_metric",
    "register_metric",
]


@dataclass(frozen=True)
class GenSample:
    """One generation-eval sample: what the model was given, what it should say, what it said."""

    prompt: str
    """The model's input text (causal_lm/instruction: the text it continues; seq2seq: the
    source)."""
    reference: str
    """The expected output (the rest of the row's text, the response, or the target)."""
    generation: str
    """What the model generated (without the prompt)."""
    task: str = "causal_lm"
    """The run's task."""

    @property
    def text(self) -> str:
        """The whole generated document: causal_lm: prompt + generation; else the generation."""
        return self.prompt + self.generation if self.task == "causal_lm" else self.generation

    def to_dict(self) -> dict[str, str]:
        """The JSON line written to samples/step-<N>.jsonl."""
        return {"prompt": self.prompt, "reference": self.reference, "generation": self.generation}


@runtime_checkable
class Metric(Protocol):
    """Scores a list of generation samples; returns score name -> value."""

    def __call__(self, samples: Sequence[GenSample]) -> Mapping[str, float]: ...


def _bleu(samples: Sequence[GenSample]) -> dict[str, float]:
    """Corpus BLEU (0-100) of the generations against the references (`kiln.metrics.bleu`)."""
    return {"bleu": bleu([s.generation for s in samples], [s.reference for s in samples])}


def _rouge(samples: Sequence[GenSample]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (0-1) of the generations against the references."""
    return rouge([s.generation for s in samples], [s.reference for s in samples])


METRICS: Registry[Metric] = Registry("metric")
"""Registered metrics by name (`kiln.registry.Registry`)."""
METRICS.add("bleu", _bleu)
METRICS.add("rouge", _rouge)
METRICS.add("recipe", recipe_metric)


def register_metric(name: str, *, replace: bool = False) -> Callable[[Metric], Metric]:
    """Decorator adding a metric under `name` (refuses a taken name unless `replace`)."""

    def add(metric: Metric) -> Metric:
        if not callable(metric):
            raise TypeError(f"metric {name!r} must be callable(samples) -> dict of scores")
        METRICS.add(name, metric, replace=replace)
        return metric

    return add


def available_metrics() -> list[str]:
    """Registered metric names, sorted."""
    return METRICS.names()


def get_metric(name: str) -> Metric:
    """The metric registered as `name`, or imported from "module:attribute".

    Raises:
        UnknownName (a KeyError): an unknown name (the message lists the registered ones), an
            import path that does not resolve, or an object that is not callable.
    """
    metric = METRICS.get(name)
    if not callable(metric):
        raise UnknownName(f"metric {name!r} is not callable")
    return metric


def compute_metrics(names: Sequence[str], samples: Sequence[GenSample]) -> dict[str, float]:
    """Every named metric over `samples`, merged into one dict of floats."""
    out: dict[str, float] = {}
    for name in names:
        for key, value in get_metric(name)(samples).items():
            out[key] = float(value)
    return out
