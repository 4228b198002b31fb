"""Corpus BLEU and ROUGE through the reference libraries: sacrebleu and rouge-score.

kiln does not re-implement either: `bleu` is `sacrebleu.corpus_bleu` and `rouge` averages
`rouge_score.rouge_scorer.RougeScorer` F1 over the samples. What these functions add is one
calling convention for both (one entry per hypothesis), input checks with clear messages, and
references whose number varies between hypotheses. Both need the `metrics` extra
(`pip install 'kiln[metrics]'`), imported when first used; without it they raise a one-line
`kiln.registry.MissingExtra` (a `KilnError`) naming it.

References: each hypothesis has one reference (a string) or several (a list of strings; the
number may vary between hypotheses).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from kiln.registry import require_extra

__all__ = ["ROUGE_TYPES", "bleu", "rouge"]

References = Sequence[str | Sequence[str]]
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _as_lists(hyps: Sequence[str], refs: References, what: str) -> list[list[str]]:
    if isinstance(hyps, str) or isinstance(refs, str):
        raise TypeError(f"{what}: pass lists of strings (one entry per hypothesis), not a string")
    if len(hyps) != len(refs):
        raise ValueError(f"{what}: {len(hyps)} hypotheses but {len(refs)} references")
    out = []
    for i, ref in enumerate(refs):
        group = [ref] if isinstance(ref, str) else [r for r in ref if r is not None]
        if not group:
            raise ValueError(f"{what}: hypothesis {i} has no reference")
        out.append(group)
    return out


def bleu(
    hyps: Sequence[str], refs: References, *, lowercase: bool = False, tokenize: str = "13a"
) -> float:
    """Corpus BLEU (0-100): `sacrebleu.corpus_bleu(hyps, reference streams).score`.

    sacrebleu's defaults: 13a tokenization, case-sensitive, 4-grams, `exp` smoothing, brevity
    penalty. Several references per hypothesis become sacrebleu's reference streams (a
    hypothesis with fewer references gets None in the streams it lacks). No hypotheses: 0.

    Args:
        hyps: one generated text per sample.
        refs: per sample, its reference text or a list of reference texts.
        lowercase: compare lowercased text.
        tokenize: a sacrebleu tokenizer name: "13a" (default), "none", "intl", "char", ...
    """
    groups = _as_lists(hyps, refs, "bleu")
    if not groups:
        return 0.0
    sacrebleu = require_extra("sacrebleu", "metrics", feature="bleu")
    width = max(len(g) for g in groups)
    streams = [[g[k] if k < len(g) else None for g in groups] for k in range(width)]
    try:
        result = sacrebleu.corpus_bleu(list(hyps), streams, lowercase=lowercase, tokenize=tokenize)
    except KeyError:  # sacrebleu looks the tokenizer up by name
        raise ValueError(f"bleu: unknown tokenize {tokenize!r} (a sacrebleu tokenizer)") from None
    return float(result.score)


@lru_cache(maxsize=8)
def _scorer(types: tuple[str, ...], use_stemmer: bool) -> Any:
    rouge_scorer = require_extra("rouge_score.rouge_scorer", "metrics", feature="rouge")
    tokenizers = require_extra("rouge_score.tokenizers", "metrics", feature="rouge")
    # The tokenizer RougeScorer would build itself, passed in: without one it logs "Using
    # default tokenizer." through absl, which reaches the root logger under kiln's prefix.
    tokenizer = tokenizers.DefaultTokenizer(use_stemmer)
    return rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer, tokenizer=tokenizer)


def rouge(
    hyps: Sequence[str],
    refs: References,
    *,
    types: Sequence[str] = ROUGE_TYPES,
    use_stemmer: bool = False,
) -> dict[str, float]:
    """Mean ROUGE F1 (0-1) over the samples, per type, from rouge-score's `RougeScorer`.

    Each sample is scored by `RougeScorer(types).score(ref, hyp).fmeasure`; with several
    references, by `score_multi` (the reference of highest F1). The corpus value is the plain
    mean over samples (0 for each type with no samples). Types: "rougeN" (N = 1..9, n-gram
    overlap) and "rougeL" (longest common subsequence).

    Args:
        hyps: one generated text per sample.
        refs: per sample, its reference text or a list of reference texts.
        types: which ROUGE scores to return.
        use_stemmer: Porter-stem tokens longer than 3 characters (rouge-score's option).
    """
    for t in types:
        if t != "rougeL" and not re.fullmatch(r"rouge[1-9]", t):
            raise ValueError(f"rouge: unknown type {t!r} (expected rouge1..rouge9 or rougeL)")
    groups = _as_lists(hyps, refs, "rouge")
    totals = dict.fromkeys(types, 0.0)
    if not groups:
        return totals
    scorer = _scorer(tuple(types), use_stemmer)
    for hyp, group in zip(hyps, groups, strict=True):
        single = len(group) == 1
        scores = scorer.score(group[0], hyp) if single else scorer.score_multi(group, hyp)
        for t in types:
            totals[t] += scores[t].fmeasure
    return {t: total / len(groups) for t, total in totals.items()}
