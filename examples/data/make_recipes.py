"""Deterministic generator for kiln's bundled demo dataset of cooking recipes.

    python examples/data/make_recipes.py           # (re)write recipes.jsonl and recipes_val.jsonl
    python examples/data/make_recipes.py --check   # exit 1 unless the files on disk match

Standard library only (``random.Random(seed)``, ``json``, ``argparse``, ``re``): the same arguments
always give byte-identical files. Train and val rows come from separate seeded streams, and a val
row whose text also occurs in train is redrawn, so the two splits share no text.

Each JSONL line is one JSON object with the keys, in this order:

* ``id`` (str): ``"r00042"`` in train, ``"v00042"`` in val.
* ``title`` (str): e.g. ``"Smoky Chickpea Stew"``, ``"Thai Chicken Curry"``.
* ``servings`` (int).
* ``ingredients`` (list[str]): e.g. ``"2 cups basmati rice"``, ``"3 cloves garlic, minced"``.
* ``steps`` (list[str]): imperative sentences starting with a cooking verb; they name the
  ingredients they use ("Add the garlic and cook for 1 minute.").
* ``tips`` (list[str]): possibly empty.
* ``cuisine`` (str).
* ``quality_score`` (float in [0, 1], 3 decimals): 0.72-1.0 for well-formed rows, 0.1-0.6 for the
  ~20% of rows that are deliberately flawed (so ``quality_score < 0.65`` marks a flawed row).
* ``difficulty`` (int 1..5): from the number of steps and ingredients and the techniques used.
* ``text`` (str): the rendered recipe. A well-formed one is laid out exactly as::

      Title: Lemon Garlic Rice
      Servings: 4

      Ingredients:
      - 2 cups basmati rice
      - 1 lemon, juiced

      Steps:
      1. Rinse the rice until the water runs clear.
      2. ...

      Tip: Toast the rice in the butter first for a nuttier flavor.

  with one ``Tip:`` line per tip (no tip block when there are no tips), no trailing whitespace
  and no final newline.

A flawed row has one flaw, and its structured fields match what its text contains: ingredients
without quantities, unnumbered steps, steps out of order, no Ingredients or no Steps section,
steps that do not start with a verb, a duplicated step, or a text truncated mid-sentence. About
1% of the rows of each split copy an earlier row of that split (all fields but ``id``), so that
deduplication has something to remove.

Recipes are built from the ingredient catalogs, cuisine pools, dish blocks (step templates) and
tips in ``recipe_vocab.py`` next to this file; its docstring describes the template syntax.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # importable from anywhere, not only as a script
    sys.path.insert(0, str(HERE))

from recipe_vocab import (  # noqa: E402
    ADJECTIVES,
    ASIAN,
    BAKE_ADJ,
    BAKE_CUISINES,
    CATALOG,
    CUISINES,
    DISHES,
    EAST,
    FIRM,
    ORDER,
    PLURAL,
    QTY,
    SAVORY_DEFAULTS,
    TECHNIQUES,
    TIPS,
    UNIT,
    WEST,
)

TRAIN_FILE, VAL_FILE = "recipes.jsonl", "recipes_val.jsonl"
FLAW_RATE, DUP_RATE = 0.2, 0.01
NL = b"\n"

ING = {}
for _cat, _blob in CATALOG.items():
    for _entry in _blob.split("|"):
        _f, _s, _t, _k, _p = (x.strip() for x in " ".join(_entry.split()).split(";"))
        ING.setdefault(_f, (_cat, _s, _t, _k, [x for x in _p.split("/") if x]))


def parse_blocks(text):
    """'== name' starts a block; 'key: value' pairs (split by ' ; ', also on the '==' line) are
    joined with '|' when a key repeats; any other line is a step template."""
    blocks, cur = {}, None
    for line in text.strip().splitlines():
        if line.startswith("== "):
            name, *pairs = line[3:].split(" ; ")
            cur = blocks[name] = {"steps": []}
        elif re.match(r"[a-z0-9]+: ", line):
            pairs = line.split(" ; ")
        else:
            cur["steps"].append(line)
            pairs = []
        for pair in pairs:
            key, val = pair.split(": ", 1)
            cur[key] = f"{cur[key]}|{val}" if key in cur else val
    return blocks


CUISINE = parse_blocks(CUISINES)
DISH = parse_blocks(DISHES)
TIP = {}
for _line in TIPS.strip().splitlines():
    _k, _v = _line.split(": ", 1)
    TIP.setdefault(_k, []).extend(_v.split("|"))


class Ing:
    """One ingredient of one recipe: its rendered line and the short name the steps use."""

    def __init__(self, full, rng, size):
        self.cat, self.short, self.title, self.kind, preps = ING[full]
        if self.kind.startswith("count:"):
            lo, hi = map(int, self.kind[6:].split("-"))
            choices = [str(k) for k in range(lo, hi + 1)]
        else:
            choices = [q.replace("_", " ") for q in QTY[self.kind].split()]
        k = round(size * (len(choices) - 1)) + rng.choice((-1, 0, 0, 1))
        self.qty = choices[max(0, min(len(choices) - 1, k))]
        one = self.qty in ("1/2", "2/3", "3/4", "1")
        sing, _, plur = full.partition("/")
        self.name = sing if one or not plur else plur
        self.unit = UNIT.get(self.kind, self.kind)
        if not one:
            self.unit = PLURAL.get(self.unit, self.unit)
        if plur or self.kind.startswith("count:"):
            self.unit = ""
        self.prep = rng.choice(preps) if preps and rng.random() < 0.85 else ""

    def line(self, qty=True):
        s = " ".join(p for p in ((self.qty, self.unit) if qty else ()) + (self.name,) if p)
        return f"{s}, {self.prep}" if self.prep else s


def names(items, article=True):
    seen = list(dict.fromkeys(x.short for x in items))
    body = ", ".join(seen[:-1]) + " and " + seen[-1] if len(seen) > 1 else "".join(seen)
    return "the " + body if article and body else body


def pick(r, spec, default):
    """Spec: '[probability] [lo-hi] option|option|...'; 'VEG' and 'PASTA' name a catalog
    category and '*' the cuisine's default pool for the role."""
    m = re.fullmatch(r"(?:(0?\.\d+) )?(?:(\d+)-(\d+) )?(.*)", spec)
    p, lo, hi, pool = m.groups()
    if p and r.rng.random() >= float(p):
        return []
    opts = []
    for o in pool.split("|"):
        if o == "*":
            opts += default
        elif o.isupper():
            opts += [k for k, v in ING.items() if v[0] == o.lower()]
        else:
            opts.append(o)
    opts = [o for o in dict.fromkeys(opts) if o not in r.used]
    chosen = r.rng.sample(opts, min(len(opts), r.rng.randint(int(lo), int(hi)) if lo else 1))
    r.used.update(chosen)
    return [Ing(o, r.rng, r.size) for o in chosen]


class Recipe:
    def __init__(self, rng, dish, cuisine):
        d, self.rng, self.dish, self.cuisine = DISH[dish], rng, dish, cuisine
        self.baking = d["cuisines"] == "BAKE"
        self.servings = int(rng.choice(d.get("servings", "2|2|4|4|4|6|6|8").split("|")))
        self.size = 0.25 + (self.servings - 8) / 16 if self.baking else (self.servings - 2) / 10
        main = rng.choice(d["main"].split("|"))
        self.used = {main}
        self.roles = {"main": [Ing(main, rng, self.size)]}
        defaults = {} if self.baking else SAVORY_DEFAULTS
        keys = [k for k in d if k not in ("steps", "titles", "adj", "cuisines", "servings", "main")]
        cz = dict(CUISINE.get(cuisine, {}), arom=EAST if cuisine in ASIAN else WEST)
        for role in [k for k in keys if k != "coin"] + [k for k in defaults if k not in keys]:
            pool = [p for p in cz.get(role, "").split("|") if p]
            self.roles[role] = pick(self, d.get(role) or defaults[role], pool)
        if "season" not in self.roles:
            self.roles["season"] = pick(self, "salt", []) + pick(self, ".7 black pepper", [])
        self.roles["top"] = self.roles.get("herb", []) + self.roles.get("finish", [])
        m = self.main = self.roles["main"][0]
        self.flags = {k for k, v in self.roles.items() if v}
        self.flags |= {f"{k}:{x.short}" for k, v in self.roles.items() for x in v}
        kinds = {
            "meat": m.cat in ("protein", "roast"),
            "cup": m.kind == "cup",
            "firm": m.short in FIRM,
        }
        kinds["soft"] = not any(kinds.values())
        kinds["cheese"] = m.cat == "finish"
        self.flags |= {k for k, v in kinds.items() if v}
        coins = d.get("coin", "").split("|")
        self.flags |= {c.split()[0] for c in coins if c and rng.random() < float(c.split()[1])}

    def ingredients(self):
        return [x for k in ORDER for x in self.roles.get(k, [])]

    def fill(self, template):
        def sub(m):
            key = m.group(1)
            if "|" in key:
                return self.rng.choice(key.split("|"))
            if key == "be":
                plural = self.main.short.endswith("s") and self.main.short not in ("asparagus",)
                return "are" if plural else "is"
            if key == "Melt":
                return "Melt" if self.roles["fat"][0].short in ("butter", "ghee") else "Heat"
            if key[0] == ".":
                return self.roles[key[1:]][0].short
            items = [x for k in key.lstrip("=").split(",") for x in self.roles.get(k, [])]
            return names(items, key[0] != "=")

        return re.sub(r"\{([^}]+)\}", sub, template)

    def steps(self):
        out = []
        for line in DISH[self.dish]["steps"]:
            words, keep = line.split(" "), True
            while words[0][0] in "+-?":
                w = words.pop(0)
                if w[0] == "?":
                    keep &= self.rng.random() < float(w[1:])
                else:
                    keep &= (w[1:] in self.flags) == (w[0] == "+")
            if keep:
                out.append(self.fill(self.rng.choice(" ".join(words).split(" || "))))
        return out

    def tips(self):
        k = self.rng.choices((0, 1, 2), (0.5, 0.4, 0.1))[0]
        alts = [a for a in DISH[self.dish]["main"].split("|") if ING[a][1] != self.main.short]
        alt = self.rng.choice([a for a in alts if ING[a][0] == self.main.cat] or alts)
        self.roles["alt"] = [Ing(alt, self.rng, self.size)]
        tips = [self.fill(t) for t in self.rng.sample(TIP[self.dish] + TIP["*"], k)]
        del self.roles["alt"]
        return tips


def render(title, servings, ingredients, steps, tips, style="num"):
    blocks = [f"Title: {title}\nServings: {servings}"]
    if ingredients:
        blocks.append("Ingredients:\n" + "\n".join(f"- {x}" for x in ingredients))
    if steps:
        prefix = {"num": "{}. ", "bullet": "- ", "plain": ""}[style]
        blocks.append("Steps:\n" + "\n".join(prefix.format(i) + s for i, s in enumerate(steps, 1)))
    if tips:
        blocks.append("\n".join(f"Tip: {t}" for t in tips))
    return "\n\n".join(blocks)


def difficulty(ingredients, steps):
    words = {w.strip(".,").lower() for s in steps for w in s.split()}
    tech = sum(1 for t in TECHNIQUES if {t, t + "s", t + "ed"} & words)
    raw = 0.4 * len(steps) + 0.15 * len(ingredients) + 0.5 * tech
    return 1 + sum(raw >= t for t in (4.2, 4.9, 5.5, 6.2))


FLAWS = {  # name: (weight, lowest score, highest score)
    "no_quantities": (2, 0.35, 0.6),
    "unnumbered": (2, 0.4, 0.6),
    "shuffled": (2, 0.2, 0.45),
    "no_ingredients": (1, 0.1, 0.3),
    "no_steps": (1, 0.1, 0.3),
    "no_verb": (2, 0.3, 0.55),
    "dup_step": (2, 0.35, 0.6),
    "truncated": (2, 0.1, 0.4),
}


def apply_flaw(rng, ings, ingredients, steps, tips):
    """Return (ingredients, steps, tips, step style, score) for one randomly chosen flaw."""
    flaw = rng.choices(list(FLAWS), [w for w, _, _ in FLAWS.values()])[0]
    score, style, steps = rng.uniform(*FLAWS[flaw][1:]), "num", list(steps)
    if flaw == "no_quantities":
        ingredients = [x.line(qty=False) for x in ings]
    elif flaw == "unnumbered":
        style = rng.choice(("bullet", "plain"))
    elif flaw == "shuffled":
        orig = list(steps)
        while steps == orig:
            rng.shuffle(steps)
    elif flaw == "no_ingredients":
        ingredients = []
    elif flaw == "no_steps":
        steps = []
    elif flaw == "no_verb":
        lead = ("Then you ", "Next you ", "Now you ", "You should ", "After that you ")
        steps = [rng.choice(lead) + s[0].lower() + s[1:] for s in steps]
    elif flaw == "dup_step":
        i = rng.randrange(len(steps))
        steps.insert(i + 1, steps[i])
    elif rng.random() < 0.25:  # truncated inside the ingredient list
        k = rng.randint(1, len(ingredients) - 1)
        words = ingredients[k].split()
        cut = [" ".join(words[: rng.randint(1, len(words) - 1)])] if len(words) > 1 else []
        ingredients, steps, tips = ingredients[:k] + cut, [], []
    else:  # truncated inside the steps
        k = rng.randint(1, len(steps) - 1)
        words = steps[k].split()
        cut = " ".join(words[: rng.randint(min(2, len(words) - 1), len(words) - 1)])
        steps = [*steps[:k], cut.rstrip(",.")]
        tips = []
    return ingredients, steps, tips, style, score


def make_row(rng, flawed):
    dish = rng.choice(list(DISH))
    d = DISH[dish]
    cuisines = BAKE_CUISINES if d["cuisines"] == "BAKE" else d["cuisines"]
    cuisine = rng.choice(list(CUISINE) if cuisines == "*" else re.split(r", |\|", cuisines))
    r = Recipe(rng, dish, cuisine)
    while not 4 <= len(r.ingredients()) <= 12:
        r = Recipe(rng, dish, cuisine)
    steps, ings = r.steps(), r.ingredients()
    word = rng.choice(d["titles"].split(", "))
    word = r.roles["base"][0].title if word == "@base" else word
    adjs = (BAKE_ADJ if r.baking else ADJECTIVES) + d["adj"].split() * 3
    main = r.main.title or r.main.short.title()
    first = cuisine if rng.random() < 0.25 and cuisine != "Scandinavian" else rng.choice(adjs)
    title = f"{first} {main} {word}"
    if not r.baking and r.roles["arom"] and rng.random() < 0.15:
        title = f"{main} and {r.roles['arom'][0].title} {word}"
    ingredients, tips = [x.line() for x in ings], r.tips()
    style, score = "num", min(1.0, rng.uniform(0.72, 0.97) + 0.01 * len(tips))
    if flawed:
        ingredients, steps, tips, style, score = apply_flaw(rng, ings, ingredients, steps, tips)
    return {
        "title": title,
        "servings": r.servings,
        "ingredients": ingredients,
        "steps": steps,
        "tips": tips,
        "cuisine": cuisine,
        "quality_score": round(score, 3),
        "difficulty": difficulty(ingredients, steps),
        "text": render(title, r.servings, ingredients, steps, tips, style),
    }


def generate(n_rows, rng, prefix, forbidden=frozenset()):
    """n_rows rows; ~1% copy an earlier row, and no other text repeats or occurs in forbidden."""
    n_dup = round(n_rows * DUP_RATE) if n_rows >= 100 else 0
    dups = set(rng.sample(range(n_rows // 10, n_rows), n_dup))
    rows, seen = [], set()
    for i in range(n_rows):
        if i in dups:
            row = {k: v for k, v in rng.choice(rows).items() if k != "id"}
        else:
            flawed = rng.random() < FLAW_RATE
            row = make_row(rng, flawed)
            while row["text"] in seen or row["text"] in forbidden:
                row = make_row(rng, flawed)
        seen.add(row["text"])
        rows.append({"id": f"{prefix}{i:05d}", **row})
    return rows


def dump(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def build_files(n_train, n_val, seed):
    train = generate(n_train, random.Random(f"kiln-recipes-train-{seed}"), "r")
    val_rng = random.Random(f"kiln-recipes-val-{seed}")
    val = generate(n_val, val_rng, "v", frozenset(r["text"] for r in train))
    return {TRAIN_FILE: dump(train), VAL_FILE: dump(val)}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate the kiln demo recipe dataset.")
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="verify the files; exit 1 on mismatch")
    args = ap.parse_args(argv)
    return write_or_check(
        build_files(args.n_train, args.n_val, args.seed), args.out_dir, args.check
    )


def write_or_check(files, out_dir, check):
    """Write `files` (name -> bytes) into `out_dir`, or with `check` compare them with what is
    there: 0, or 1 naming each file that is missing or differs."""
    if check:
        bad = [
            name
            for name, data in files.items()
            if not (out_dir / name).is_file() or (out_dir / name).read_bytes() != data
        ]
        for name in bad:
            print(f"mismatch: {out_dir / name} is missing or differs from the generator output")
        if not bad:
            print(f"ok: {', '.join(files)} in {out_dir} match the generator")
        return 1 if bad else 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
        print(f"wrote {out_dir / name} ({data.count(NL)} rows, {len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
