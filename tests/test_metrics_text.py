"""BLEU and ROUGE: parity with sacrebleu's corpus_bleu and rouge-score's RougeScorer (1e-9)."""

from __future__ import annotations

import random

import pytest

from kiln.metrics import bleu, rouge

sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

_TEXT = (
    "the a cup of rice, stir. Add 1.5 g salt; 3-4 mins! (optional) & &amp; &quot;hot&quot; "
    "café naïve crème brûlée 日本語 Ünïcödé über-cool it's -- x/y 10,000 e.g. U.S.A."
)
_WORDS = _TEXT.split()


def _sentence(rng: random.Random, n_max: int = 14) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, n_max)))


def _sacre(hyps: list[str], refs: list[list[str | None]]) -> float:
    """sacrebleu wants reference streams (one list per reference slot; None where missing)."""
    k = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(k)]
    return sacrebleu.corpus_bleu(hyps, streams).score


def _rouge_ref(hyps: list[str], refs: list[list[str]], stem: bool = False) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stem)
    out = dict.fromkeys(("rouge1", "rouge2", "rougeL"), 0.0)
    for hyp, group in zip(hyps, refs, strict=True):
        scores = scorer.score_multi(group, hyp)
        for key in out:
            out[key] += scores[key].fmeasure
    return {key: value / len(hyps) for key, value in out.items()}


HAND_CASES = [
    # (hypotheses, references per hypothesis)
    (["The cat sat on the mat."], [["The cat sat on the mat."]]),
    (["the cat"], [["The cat is on the mat."]]),  # brevity penalty, case-sensitive
    (["", "Stir the rice."], [["Stir the rice well."], ["Stir the rice."]]),  # empty hypothesis
    (["", ""], [["Add salt."], ["Serve."]]),  # every hypothesis empty
    (["Whisk the eggs."], [[""]]),  # empty reference
    (["café crème brûlée 日本語 です"], [["café crème brûlée 日本語 です。"]]),  # unicode
    (["Ünïcödé — “quotes” \u2018x\u2019 …"], [["Ünïcödé — “quotes” \u2018y\u2019 …"]]),
    (
        ["It is a guide to action which ensures that the military always obeys the commands."],
        [
            [
                "It is a guide to action that ensures that the military will forever heed "
                "Party commands.",
                "It is the guiding principle which guarantees the military forces always being "
                "under the command of the Party.",
                "It is the practical guide for the army always to heed the directions of the "
                "party.",
            ]
        ],
    ),  # multi-reference
    (["a b c d", "e f"], [["a b c d", "a b"], ["e f g"]]),  # variable reference counts
    (["1,000 people - 3-4 x. y,z"], [["1,000 people -- 3 - 4 x . y , z"]]),  # 13a number rules
    (["line one\nline two-\nthree"], [["line one line twothree"]]),  # newlines, hyphenation
]


@pytest.mark.parametrize(("hyps", "refs"), HAND_CASES)
def test_bleu_equals_sacrebleu(hyps: list[str], refs: list[list[str]]) -> None:
    assert bleu(hyps, refs) == pytest.approx(_sacre(hyps, refs), abs=1e-9)


@pytest.mark.parametrize(("hyps", "refs"), HAND_CASES)
def test_rouge_equals_rouge_score(hyps: list[str], refs: list[list[str]]) -> None:
    ours = rouge(hyps, refs)
    for key, value in _rouge_ref(hyps, refs).items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key


def test_bleu_and_rouge_parity_on_random_corpora() -> None:
    rng = random.Random(1234)
    for trial in range(150):
        n = rng.randint(1, 6)
        hyps = [_sentence(rng) for _ in range(n)]
        refs = [[_sentence(rng, 18) for _ in range(rng.randint(1, 3))] for _ in range(n)]
        assert bleu(hyps, refs) == pytest.approx(_sacre(hyps, refs), abs=1e-9), trial
        stem = trial % 3 == 0
        ours = rouge(hyps, refs, use_stemmer=stem)
        for key, value in _rouge_ref(hyps, refs, stem).items():
            assert ours[key] == pytest.approx(value, abs=1e-9), (trial, key)


def test_bleu_options_match_sacrebleu() -> None:
    hyps, refs = ["The Cat sat on THE mat ."], ["the cat sat on the mat."]
    lower = sacrebleu.corpus_bleu(hyps, [refs], lowercase=True).score
    none = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none").score
    assert bleu(hyps, refs, lowercase=True) == pytest.approx(lower, abs=1e-9)
    assert bleu(hyps, refs, tokenize="none") == pytest.approx(none, abs=1e-9)
    assert bleu(hyps, refs, lowercase=True) > bleu(hyps, refs)


def test_known_values() -> None:
    assert bleu(["Stir the rice well."], ["Stir the rice well."]) == pytest.approx(100.0)
    assert bleu(["", ""], ["Add salt.", "Serve."]) == 0.0
    assert rouge(["Stir the rice."], ["Stir the rice."]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    )
    # rouge1: 2 of 3 hyp unigrams in 2 of 4 ref unigrams: P=2/3, R=1/2, F=4/7.
    assert rouge(["stir the soup"], ["stir the rice well"])["rouge1"] == pytest.approx(4 / 7)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="not a string"):
        rouge("abc", "abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hypothesis 0 has no reference"):
        bleu(["a"], [[]])
    with pytest.raises(ValueError, match="unknown type"):
        rouge(["a"], ["a"], types=["rougeX"])
    with pytest.raises(ValueError, match="unknown tokenize 'nope'"):
        bleu(["a"], ["a"], tokenize="nope")


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from kiln.metrics import text
    from kiln.registry import MissingExtra

    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", None)
    text._scorer.cache_clear()
    try:
        with pytest.raises(MissingExtra, match=r"^bleu needs sacrebleu \(.*'kiln\[metrics\]'$"):
            bleu(["a"], ["a"])
        with pytest.raises(MissingExtra, match=r"^rouge needs rouge_score \(.*'kiln\[metrics\]'$"):
            rouge(["a"], ["a"])
    finally:
        text._scorer.cache_clear()
