"""Corpus BLEU and ROUGE, computed as sacrebleu and rouge-score compute them.

Both are pure Python (no extra needed); `tests/test_metrics_text.py` checks them against
sacrebleu's `corpus_bleu` and rouge-score's `RougeScorer` to 1e-9.

References: each hypothesis has one reference (a string) or several (a list of strings; the
number may vary between hypotheses).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

__all__ = ["bleu", "bleu_stats", "rouge", "rouge_tokenize", "tokenize_13a"]

References = Sequence[str | Sequence[str]]

# mteval-v13a tokenization, as sacrebleu's `Tokenizer13a` + `TokenizerRegexp` do it.
_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period and comma unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash preceded by a digit
)
_MAX_ORDER = 4
_LOG_ZERO = -9999999999  # sacrebleu's floor for log(0)


@lru_cache(maxsize=2**16)
def tokenize_13a(line: str) -> str:
    """Tokenize one segment as mteval-v13a (sacrebleu's default `13a` tokenizer) does."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&")
        line = line.replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def _ngrams(tokens: list[str], max_order: int) -> Counter[tuple[str, ...]]:
    return Counter(
        tuple(tokens[i : i + n])
        for n in range(1, max_order + 1)
        for i in range(len(tokens) - n + 1)
    )


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


def bleu_stats(
    hyps: Sequence[str], refs: References, *, lowercase: bool = False, tokenize: str = "13a"
) -> list[int]:
    """BLEU's sufficient statistics: [hyp_len, ref_len, correct_1..4, total_1..4].

    The reference length of a segment is the one closest to its hypothesis length (the shorter
    on a tie); n-gram counts are clipped by the maximum count over the segment's references.
    """
    if tokenize not in ("13a", "none"):
        raise ValueError(f"tokenize: expected '13a' or 'none', got {tokenize!r}")
    groups = _as_lists(hyps, refs, "bleu")

    def prep(text: str) -> list[str]:
        text = text.lower() if lowercase else text
        text = text.rstrip()
        return (tokenize_13a(text) if tokenize == "13a" else text).split()

    stats = [0] * (2 + 2 * _MAX_ORDER)
    for hyp, group in zip(hyps, groups, strict=True):
        ref_counts: Counter[tuple[str, ...]] = Counter()
        ref_lens = []
        for ref in group:
            tokens = prep(ref)
            ref_lens.append(len(tokens))
            for gram, count in _ngrams(tokens, _MAX_ORDER).items():
                ref_counts[gram] = max(ref_counts[gram], count)
        tokens = prep(hyp)
        hyp_len = len(tokens)
        closest = min(ref_lens, key=lambda n: (abs(hyp_len - n), n))
        stats[0] += hyp_len
        stats[1] += closest
        for gram, count in _ngrams(tokens, _MAX_ORDER).items():
            n = len(gram) - 1
            stats[2 + _MAX_ORDER + n] += count
            stats[2 + n] += min(count, ref_counts.get(gram, 0))
    return stats


def bleu(
    hyps: Sequence[str], refs: References, *, lowercase: bool = False, tokenize: str = "13a"
) -> float:
    """Corpus BLEU (0-100), equal to `sacrebleu.corpus_bleu` with its defaults.

    Defaults match sacrebleu's: 13a tokenization, case-sensitive, 4-gram, `exp` smoothing
    (an n-gram order with no match gets precision 1 / (2^k * total), k counting such orders),
    brevity penalty exp(1 - ref_len / hyp_len) when the output is shorter.

    Args:
        hyps: one generated text per sample.
        refs: per sample, its reference text or a list of reference texts.
        lowercase: compare lowercased text.
        tokenize: "13a" (sacrebleu's default) or "none" (split on whitespace only).
    """
    stats = bleu_stats(hyps, refs, lowercase=lowercase, tokenize=tokenize)
    sys_len, ref_len = stats[0], stats[1]
    correct, total = stats[2 : 2 + _MAX_ORDER], stats[2 + _MAX_ORDER :]
    bp = 1.0
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    if not any(correct):
        return 0.0
    precisions = [0.0] * _MAX_ORDER
    smooth = 1.0
    for n in range(_MAX_ORDER):
        if total[n] == 0:
            break
        if correct[n] == 0:
            smooth *= 2
            precisions[n] = 100.0 / (smooth * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    logs = [math.log(p) if p != 0.0 else _LOG_ZERO for p in precisions]
    return bp * math.exp(sum(logs) / _MAX_ORDER)


# ---- ROUGE ------------------------------------------------------------------------------------

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_VALID = re.compile(r"^[a-z0-9]+$")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_tokenize(text: str, stemmer: object | None = None) -> list[str]:
    """rouge-score's tokenizer: lowercase, non-[a-z0-9] characters become spaces (so accented
    letters and other scripts are dropped), optional Porter stemming of tokens over 3 chars."""
    tokens = _NON_ALNUM.sub(" ", text.lower()).split()
    if stemmer is not None:
        tokens = [stemmer.stem(t) if len(t) > 3 else t for t in tokens]  # type: ignore[attr-defined]
    return [t for t in tokens if _VALID.match(t)]


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _rouge_n(ref: list[str], hyp: list[str], n: int) -> float:
    ref_grams = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
    hyp_grams = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
    overlap = sum(min(count, hyp_grams[gram]) for gram, count in ref_grams.items())
    precision = overlap / max(sum(hyp_grams.values()), 1)
    recall = overlap / max(sum(ref_grams.values()), 1)
    return _f1(precision, recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def _rouge_l(ref: list[str], hyp: list[str]) -> float:
    if not ref or not hyp:
        return 0.0
    lcs = _lcs_length(ref, hyp)
    return _f1(lcs / len(hyp), lcs / len(ref))


def _score(ref: list[str], hyp: list[str], rouge_type: str) -> float:
    if rouge_type == "rougeL":
        return _rouge_l(ref, hyp)
    return _rouge_n(ref, hyp, int(rouge_type[5:]))


def rouge(
    hyps: Sequence[str],
    refs: References,
    *,
    types: Sequence[str] = ROUGE_TYPES,
    use_stemmer: bool = False,
) -> dict[str, float]:
    """Mean ROUGE F1 (0-1) over the samples, per type, as rouge-score's `RougeScorer` scores.

    Each sample is scored by `RougeScorer(types).score(ref, hyp).fmeasure`; with several
    references, by the reference of highest F1 (`score_multi`). The corpus value is the plain
    mean over samples. Types: "rougeN" (N = 1..9, n-gram overlap) and "rougeL" (longest common
    subsequence).

    Args:
        hyps: one generated text per sample.
        refs: per sample, its reference text or a list of reference texts.
        types: which ROUGE scores to return.
        use_stemmer: Porter-stem tokens longer than 3 characters (needs nltk, from
            `pip install 'kiln[metrics]'`).
    """
    for t in types:
        if t != "rougeL" and not re.fullmatch(r"rouge[1-9]", t):
            raise ValueError(f"rouge: unknown type {t!r} (expected rouge1..rouge9 or rougeL)")
    groups = _as_lists(hyps, refs, "rouge")
    stemmer = _porter() if use_stemmer else None
    totals = dict.fromkeys(types, 0.0)
    for hyp, group in zip(hyps, groups, strict=True):
        hyp_tokens = rouge_tokenize(hyp, stemmer)
        ref_tokens = [rouge_tokenize(r, stemmer) for r in group]
        for t in types:
            totals[t] += max(_score(ref, hyp_tokens, t) for ref in ref_tokens)
    n = max(len(hyps), 1)
    return {t: total / n for t, total in totals.items()}


def _porter() -> object:
    try:
        from nltk.stem import porter
    except ImportError:
        raise ImportError(
            "rouge(use_stemmer=True) needs nltk: pip install 'kiln[metrics]'"
        ) from None
    return porter.PorterStemmer()  # as rouge-score builds it
