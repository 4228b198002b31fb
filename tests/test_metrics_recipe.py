"""Recipe metrics on hand-written good and bad recipes, and the metric registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.metrics import GenSample, compute_metrics, get_metric, recipe_scores, register_metric
from kiln.metrics.recipe import ingredient_name, parse_recipe
from kiln.metrics.registry import METRICS

HEAD = "Title: Lemon Garlic Rice\nServings: 4\n\n"
INGREDIENTS = (
    "Ingredients:\n- 2 cups basmati rice, rinsed\n- 3 cloves garlic, minced\n"
    "- 1 lemon, juiced\n- 2 tbsp olive oil"
)
STEPS = [
    "Heat the olive oil in a pot over medium heat.",
    "Add the garlic and cook for 1 minute.",
    "Stir in the rice and 3 cups of water, then simmer for 15 minutes.",
    "Fluff the rice, add the lemon and serve.",
]


def _steps(steps: list[str], fmt: str = "{k}. {s}") -> str:
    return "Steps:\n" + "\n".join(fmt.format(k=k, s=s) for k, s in enumerate(steps, 1))


GOOD = HEAD + INGREDIENTS + "\n\n" + _steps(STEPS) + "\n\nTip: Toast the rice in the oil first."


def _scores(text: str) -> dict[str, float]:
    scores = recipe_scores(text)
    assert scores["recipe_overall"] == pytest.approx(
        sum(v for k, v in scores.items() if k != "recipe_overall") / 4
    )
    return {k.removeprefix("recipe_"): v for k, v in scores.items() if k != "recipe_overall"}


def test_a_well_formed_recipe_scores_one() -> None:
    assert _scores(GOOD) == {
        "format": 1.0,
        "completeness": 1.0,
        "ingredients": 1.0,
        "instructions": 1.0,
    }
    recipe = parse_recipe(GOOD)
    assert recipe.title == "Lemon Garlic Rice"
    assert recipe.ingredients[0] == "2 cups basmati rice, rinsed"
    assert recipe.steps[1] == STEPS[1]


def test_ingredient_names() -> None:
    assert ingredient_name("2 cups basmati rice, rinsed") == "basmati rice"
    assert ingredient_name("1 1/2 tsp ground cumin") == "ground cumin"
    assert ingredient_name("3 large eggs") == "large eggs"  # a count, no unit
    assert ingredient_name("2-3 sprigs of thyme") == "thyme"
    assert ingredient_name("salt") == "salt"


BAD = {
    # name: (text, expected format, completeness, ingredients, instructions)
    "no quantities": (
        HEAD + "Ingredients:\n- basmati rice\n- garlic\n- lemon\n- olive oil\n\n" + _steps(STEPS),
        1.0,
        1.0,
        0.5,  # every item referenced, none quantified
        1.0,
    ),
    "unnumbered steps": (
        HEAD + INGREDIENTS + "\n\n" + _steps(STEPS, "- {s}"),
        5 / 6,  # the step lines are not "k. text"
        1.0,
        1.0,
        0.75,  # numbered fails on every step
    ),
    "steps without a verb": (
        HEAD + INGREDIENTS + "\n\n" + _steps([f"Then you {s[0].lower()}{s[1:]}" for s in STEPS]),
        1.0,
        1.0,
        1.0,
        0.75,
    ),
    "duplicated step": (
        HEAD + INGREDIENTS + "\n\n" + _steps([*STEPS[:2], STEPS[1], *STEPS[2:]]),
        1.0,
        1.0,
        1.0,
        (4 + 0.75) / 5,  # the repeat fails "not duplicated"
    ),
    "no steps": (
        HEAD + INGREDIENTS,
        4 / 6,  # layout and step lines fail
        2 / 3,
        0.5,  # quantified, but nothing references them
        0.0,
    ),
    "truncated mid-step": (
        HEAD + INGREDIENTS + "\n\n" + _steps([*STEPS[:2], "Stir in the rice and"]),
        1.0,
        1.0,
        (3 + 0.5) / 4,  # the lemon is never used
        (2 + 0.75) / 3,  # the cut step is not a full sentence
    ),
    "steps out of order": (
        HEAD
        + INGREDIENTS
        + "\n\n"
        + "Steps:\n1. "
        + STEPS[0]
        + "\n3. "
        + STEPS[2]
        # "2." is in the wrong place; the second and third lines are misnumbered.
        + "\n2. "
        + STEPS[1]
        + "\n4. "
        + STEPS[3],
        5 / 6,
        1.0,
        1.0,
        (4 - 2 * 0.25) / 4,
    ),
    "not a recipe": ("rice rice rice", 1 / 6, 0.0, 0.0, 0.0),
    "sections swapped, extra spaces": (
        "Title: Rice \nServings: four\n\n" + _steps(STEPS) + "\n\n" + INGREDIENTS,
        # Title line passes; servings not an integer, sections out of order, trailing space
        # fail; the ingredient and step lines themselves are fine.
        3 / 6,
        1.0,
        1.0,
        1.0,
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_flawed_recipes_lose_exactly_what_they_lack(name: str) -> None:
    text, fmt, complete, ingredients, instructions = BAD[name]
    assert _scores(text) == pytest.approx(
        {
            "format": fmt,
            "completeness": complete,
            "ingredients": ingredients,
            "instructions": instructions,
        }
    )


def test_recipe_metric_scores_prompt_plus_generation() -> None:
    prompt, rest = GOOD.split("\n", 1)
    causal = GenSample(prompt + "\n", "", rest, "causal_lm")
    assert causal.text == GOOD
    assert get_metric("recipe")([causal])["recipe_overall"] == 1.0
    # seq2seq: the generation alone is the document.
    s2s = GenSample("Title: Lemon Garlic Rice", "", rest, "seq2seq")
    assert get_metric("recipe")([s2s])["recipe_completeness"] == pytest.approx(2 / 3)
    mixed = get_metric("recipe")([causal, GenSample("", "", "junk", "causal_lm")])
    assert mixed["recipe_completeness"] == pytest.approx(0.5)


def test_the_demo_data_good_rows_beat_the_flawed_ones() -> None:
    path = Path(__file__).parent.parent / "examples" / "data" / "recipes_val.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    good = [recipe_scores(r["text"]) for r in rows if r["quality_score"] >= 0.65]
    flawed = [recipe_scores(r["text"]) for r in rows if r["quality_score"] < 0.65]

    def mean(scores: list[dict[str, float]], key: str) -> float:
        return sum(s[key] for s in scores) / len(scores)

    assert mean(good, "recipe_format") == 1.0
    assert mean(good, "recipe_completeness") == 1.0
    assert mean(good, "recipe_overall") > 0.98
    assert mean(flawed, "recipe_overall") < mean(good, "recipe_overall") - 0.08


def test_registry_adds_metrics_by_name_and_by_import_path() -> None:
    @register_metric("test_chars")
    def chars(samples):  # type: ignore[no-untyped-def]
        return {"chars": sum(len(s.generation) for s in samples) / len(samples)}

    try:
        samples = [GenSample("p", "ref", "abcd"), GenSample("p", "ref", "ab")]
        assert compute_metrics(["test_chars", "bleu"], samples) == {
            "chars": 3.0,
            "bleu": 0.0,
        }
        with pytest.raises(ValueError, match="already registered"):
            register_metric("test_chars")(chars)
    finally:
        METRICS.pop("test_chars")
    by_path = get_metric("kiln.metrics.recipe:recipe_metric")
    assert by_path is METRICS["recipe"]
    with pytest.raises(KeyError, match="unknown metric 'nope'"):
        get_metric("nope")
    with pytest.raises(KeyError, match="cannot import"):
        get_metric("kiln.metrics.recipe:missing")
    rouge = compute_metrics(["rouge"], [GenSample("p", "stir the rice", "stir the rice")])
    assert rouge == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
