"""Recipe metrics: scores in [0, 1] for a generated recipe in the demo dataset's layout.

The layout (see examples/data/make_recipes.py) is::

    Title: Lemon Garlic Rice
    Servings: 4

    Ingredients:
    - 2 cups basmati rice
    - 1 lemon, juiced

    Steps:
    1. Rinse the rice until the water runs clear.
    2. Cook the rice with the lemon for 15 minutes.

    Tip: Toast the rice in the butter first for a nuttier flavor.

`parse_recipe` reads any text leniently (sections in any order, any bullet or numbering), and
each score below checks one aspect of what it found. `recipe_scores(text)` returns all five;
`recipe_metric(samples)` averages them over generated samples (registered as "recipe").
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "COOKING_VERBS",
    "DESCRIPTORS",
    "UNITS",
    "ParsedRecipe",
    "completeness",
    "format_correctness",
    "ingredient_coherence",
    "ingredient_name",
    "instruction_quality",
    "parse_recipe",
    "recipe_metric",
    "recipe_scores",
]


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


COOKING_VERBS = _words(
    """add arrange assemble bake baste beat blanch blend boil braise bring broil brown brush
    char chill chop coat combine cook cool core cover cream crumble crush cut deglaze dice
    dissolve divide drain drizzle dust finish flip fluff fold fry garnish glaze grate grease
    grill grind heat knead ladle layer let line marinate mash measure melt microwave mince mix
    pat peel pick pipe place poach pound pour preheat press puree reduce refrigerate remove
    rest return rinse roast roll rub saute scatter score scrape sear season serve set shape
    shred sift simmer skewer skim slice soak spoon sprinkle spread squeeze steam steep stir
    strain stuff swirl taste thread toast top toss transfer trim turn wash whip whisk wipe work
    wrap zest"""
)
"""First words that make a step an instruction (lowercase; extend for your own data)."""

UNITS = _words(
    """cup cups tbsp tablespoon tablespoons tsp teaspoon teaspoons g gram grams kg ml l liter
    liters litre litres oz ounce ounces lb lbs pound pounds clove cloves pinch pinches dash
    can cans slice slices sprig sprigs bunch bunches stick sticks handful"""
)
"""Measurement units an ingredient quantity may carry; any other word after the number makes
the quantity a count ("3 large eggs")."""

DESCRIPTORS = _words(
    """fresh large small medium ground dried whole ripe red green white black yellow plain extra
    virgin boneless skinless unsalted salted grated chopped cooked raw frozen canned light dark
    sweet hot cold warm baby young thin thick"""
)
"""Words of an ingredient name that do not identify it (skipped by the reference check)."""

_QUANTITY = re.compile(r"^(\d+(?:[./]\d+)?(?:\s+\d+/\d+)?(?:\s*-\s*\d+(?:[./]\d+)?)?)\s+(\S.*)$")
_NUMBERED = re.compile(r"^(\d+)[.)]\s+(.*)$")
_BULLET = re.compile(r"^(?:[-*•]\s+)(.*)$")
_WORD = re.compile(r"[a-z]+")
_HEADERS = ("Ingredients:", "Steps:")


@dataclass
class ParsedRecipe:
    """What `parse_recipe` found in a text."""

    title: str | None = None
    """The text after "Title:" on a line of its own, or None."""
    servings: str | None = None
    """The text after "Servings:", or None."""
    ingredient_lines: list[str] = field(default_factory=list)
    """Non-blank lines after "Ingredients:" up to the next blank line or header, as written."""
    step_lines: list[str] = field(default_factory=list)
    """Non-blank lines after "Steps:" up to the next blank line or header, as written."""
    has_ingredients_header: bool = False
    has_steps_header: bool = False

    @property
    def ingredients(self) -> list[str]:
        """Ingredient lines without their bullet."""
        return [_strip_marker(line) for line in self.ingredient_lines]

    @property
    def steps(self) -> list[str]:
        """Step lines without their number or bullet."""
        return [_strip_marker(line) for line in self.step_lines]


def _strip_marker(line: str) -> str:
    for pattern in (_NUMBERED, _BULLET):
        m = pattern.match(line)
        if m:
            return m.group(m.lastindex or 1).strip()
    return line.strip()


def parse_recipe(text: str) -> ParsedRecipe:
    """Find the title, servings, ingredient lines and step lines of a recipe text.

    Lenient: a section runs from its header line to the next blank line or header, wherever
    it is; the first "Title:" and "Servings:" lines anywhere are taken.
    """
    recipe = ParsedRecipe()
    section: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line in _HEADERS:
            if line == "Ingredients:" and not recipe.has_ingredients_header:
                recipe.has_ingredients_header, section = True, recipe.ingredient_lines
            elif line == "Steps:" and not recipe.has_steps_header:
                recipe.has_steps_header, section = True, recipe.step_lines
            else:
                section = None  # a repeated header starts nothing
            continue
        if not line:
            section = None
            continue
        if line.startswith("Title:") and recipe.title is None:
            recipe.title, section = line[6:].strip(), None
        elif line.startswith("Servings:") and recipe.servings is None:
            recipe.servings, section = line[9:].strip(), None
        elif section is not None:
            section.append(line)
    return recipe


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("oes", "ches", "shes", "sses")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def ingredient_name(item: str) -> str:
    """The ingredient an item names: without quantity, unit and preparation ("2 cups basmati
    rice, rinsed" -> "basmati rice")."""
    m = _QUANTITY.match(item)
    rest = m.group(2) if m else item
    words = rest.split(None, 1)
    if m and words and words[0].lower().rstrip(".") in UNITS:
        rest = words[1] if len(words) > 1 else ""
    if rest.lower().startswith("of "):
        rest = rest[3:]
    return rest.split(",", 1)[0].strip()


def ingredient_coherence(recipe: ParsedRecipe) -> float:
    """Mean over ingredient items of two checks, 0.0 when there are none.

    1. Quantified: the item starts with a quantity (an integer, decimal, fraction, mixed
       number like "1 1/2", or range like "2-3") followed by a unit from `UNITS` and a name,
       or directly by a name, which makes it a count ("3 large eggs").
    2. Referenced: a word of its name (`ingredient_name`) of 3 or more letters that is not a
       descriptor (`DESCRIPTORS`: "fresh", "large", "ground", ...) occurs as a word in the
       steps, compared singular to singular ("celery stalks" is referenced by "the celery",
       "3 large eggs" by "the egg").
    """
    items = recipe.ingredients
    if not items:
        return 0.0
    step_words = {_singular(w) for s in recipe.steps for w in _WORD.findall(s.lower())}
    total = 0.0
    for item in items:
        m = _QUANTITY.match(item)
        name = ingredient_name(item)
        quantified = bool(m) and bool(name)
        words = {_singular(w) for w in _WORD.findall(name.lower()) if len(w) >= 3}
        referenced = bool(words - DESCRIPTORS & step_words)
        total += (quantified + referenced) / 2
    return total / len(items)


def instruction_quality(recipe: ParsedRecipe) -> float:
    """Mean over step lines of four checks, 0.0 when there are none.

    1. Numbered: the line is "<k>. <text>" (or "<k>) <text>") with k its 1-based position.
    2. Verb: the first word of the text (lowercased, punctuation stripped) is in
       `COOKING_VERBS`.
    3. Not empty: the text has at least 3 words and ends with ".", "!" or ")" (a step cut off
       mid-sentence is empty of its meaning).
    4. Not duplicated: no earlier step has the same text (case and spacing ignored).
    """
    lines = recipe.step_lines
    if not lines:
        return 0.0
    seen: set[str] = set()
    total = 0.0
    for k, line in enumerate(lines, 1):
        m = _NUMBERED.match(line)
        numbered = bool(m) and int(m.group(1)) == k  # type: ignore[union-attr]
        text = _strip_marker(line)
        first = _WORD.findall(text.split()[0].lower()) if text.split() else []
        verb = bool(first) and first[0] in COOKING_VERBS
        full = len(text.split()) >= 3 and text.endswith((".", "!", ")"))
        key = " ".join(text.lower().split())
        unique = key not in seen
        seen.add(key)
        total += (numbered + verb + full + unique) / 4
    return total / len(lines)


def completeness(recipe: ParsedRecipe) -> float:
    """Fraction of three parts present: a non-empty title, at least one ingredient under an
    "Ingredients:" header, and at least one step under a "Steps:" header."""
    parts = (bool(recipe.title), bool(recipe.ingredient_lines), bool(recipe.step_lines))
    return sum(parts) / 3


def format_correctness(text: str) -> float:
    """Fraction of six checks of the training data's exact layout (module docstring):

    1. The first line is "Title: <text>".
    2. The second line is "Servings: <integer>".
    3. The text is blocks separated by single blank lines: the title block (those two lines),
       an "Ingredients:" block, a "Steps:" block, then at most one block of "Tip: " lines;
       nothing else, in that order.
    4. The ingredients block has at least one line and every line is "- <text>".
    5. The steps block has at least one line and its lines are "1. <text>", "2. <text>", ...
    6. No line has leading or trailing whitespace and the text neither starts nor ends with a
       blank line.
    """
    lines = text.split("\n")
    checks = [
        bool(re.fullmatch(r"Title: \S.*", lines[0])),
        len(lines) > 1 and bool(re.fullmatch(r"Servings: \d+", lines[1])),
    ]
    blocks = text.split("\n\n")
    ingredients = next((b for b in blocks if b.startswith("Ingredients:\n")), None)
    steps = next((b for b in blocks if b.startswith("Steps:\n")), None)
    layout = (
        len(blocks) in (3, 4)
        and blocks[0].count("\n") == 1
        and blocks[1] is ingredients
        and blocks[2] is steps
        and all(b.strip() for b in blocks)
        and (len(blocks) == 3 or all(x.startswith("Tip: ") for x in blocks[3].split("\n")))
    )
    checks.append(layout)
    ing_lines = ingredients.split("\n")[1:] if ingredients else []
    checks.append(bool(ing_lines) and all(re.fullmatch(r"- \S.*", x) for x in ing_lines))
    step_lines = steps.split("\n")[1:] if steps else []
    checks.append(
        bool(step_lines)
        and all(re.fullmatch(rf"{k}\. \S.*", x) for k, x in enumerate(step_lines, 1))
    )
    checks.append(all(x == x.strip() for x in lines) and bool(lines[0]) and bool(lines[-1].strip()))
    return sum(checks) / len(checks)


def recipe_scores(text: str) -> dict[str, float]:
    """All recipe scores of one text; `recipe_overall` is the mean of the other four."""
    recipe = parse_recipe(text)
    scores = {
        "recipe_format": format_correctness(text),
        "recipe_completeness": completeness(recipe),
        "recipe_ingredients": ingredient_coherence(recipe),
        "recipe_instructions": instruction_quality(recipe),
    }
    scores["recipe_overall"] = sum(scores.values()) / 4
    return scores


def recipe_metric(samples: Sequence[Any]) -> dict[str, float]:
    """Mean `recipe_scores` of the samples' full texts (`GenSample.text`: for causal_lm the
    prompt plus the generation, which together are the recipe; else the generation)."""
    texts = [getattr(s, "text", s) if not isinstance(s, Mapping) else s["text"] for s in samples]
    if not texts:
        return {}
    rows = [recipe_scores(t) for t in texts]
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
