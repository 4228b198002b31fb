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

Recipes are built from the catalogs below: a dish block picks the ingredients of each role and
lists step templates; ``{role}`` renders "the <names>", ``{=role}`` the names without "the",
``{.role}`` the first name alone, ``{a|b}`` a random choice; a line prefixed ``+flag``/``-flag``
is kept only if the flag (a non-empty role, ``meat``, ``cup``, ...) is set/unset, ``?p`` keeps it
with probability p, and ``a || b`` picks one of two whole sentences.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN_FILE, VAL_FILE = "recipes.jsonl", "recipes_val.jsonl"
FLAW_RATE, DUP_RATE = 0.2, 0.01
NL = b"\n"

# "full name;short name;title word;quantity kind;prep/prep". Counted items are "singular/plural".
CATALOG = {
    "grain": """basmati rice;rice;Rice;cup;rinsed|arborio rice;rice;Rice;cup;
        |long-grain rice;rice;Rice;cup;rinsed|quinoa;quinoa;Quinoa;cup;rinsed
        |farro;farro;Farro;cup;|bulgur;bulgur;Bulgur;cup;|couscous;couscous;Couscous;cup;""",
    "pasta": """spaghetti;spaghetti;Spaghetti;g;|penne;penne;Penne;g;
        |rigatoni;rigatoni;Rigatoni;g;|linguine;linguine;Linguine;g;|fusilli;fusilli;Fusilli;g;
        |orecchiette;pasta;Orecchiette;g;""",
    "protein": """chicken thighs;chicken;Chicken;g;boneless, cut into chunks/skinless, diced
        |chicken breast;chicken;Chicken;g;thinly sliced/cut into strips/diced
        |beef chuck;beef;Beef;g;cut into 3 cm cubes|beef sirloin;beef;Beef;g;thinly sliced
        |lamb shoulder;lamb;Lamb;g;cut into chunks|pork shoulder;pork;Pork;g;cubed
        |pork tenderloin;pork;Pork;g;thinly sliced|shrimp;shrimp;Shrimp;g;peeled and deveined
        |salmon fillets;salmon;Salmon;g;skin removed/cut into pieces
        |white fish fillets;fish;Fish;g;cut into strips|firm tofu;tofu;Tofu;g;pressed and cubed
        |paneer;paneer;Paneer;g;cubed|Italian sausage;sausage;Sausage;g;casings removed
        |pancetta;pancetta;Pancetta;g;diced|ham;ham;Ham;g;diced|ground beef;beef;Beef;g;
        |halloumi;halloumi;Halloumi;g;cut into cubes""",
    "roast": """whole chicken/whole chickens;chicken;Chicken;count:1-1;patted dry
        |pork loin;pork;Pork;kg;tied|leg of lamb;lamb;Lamb;kg;scored|beef topside;beef;Beef;kg;
        |pork belly;pork belly;Pork Belly;kg;skin scored""",
    "legume": """red lentils;lentils;Lentil;cup;rinsed|green lentils;lentils;Lentil;cup;rinsed
        |chickpeas;chickpeas;Chickpea;g;drained and rinsed|black beans;beans;Black Bean;g;drained
        |white beans;beans;White Bean;g;drained and rinsed|split peas;split peas;Split Pea;cup;""",
    "veg": """butternut squash;squash;Squash;g;peeled and cubed
        |carrot/carrots;carrots;Carrot;count:2-4;diced/sliced|tomatoes;tomatoes;Tomato;g;chopped
        |potatoes;potatoes;Potato;g;peeled and cubed/cut into wedges
        |sweet potatoes;sweet potatoes;Sweet Potato;g;peeled and cubed
        |mushrooms;mushrooms;Mushroom;g;sliced/quartered|spinach;spinach;Spinach;g;
        |cauliflower;cauliflower;Cauliflower;g;cut into florets
        |broccoli;broccoli;Broccoli;g;cut into florets
        |eggplant/eggplants;eggplant;Eggplant;count:1-2;cubed
        |zucchini/zucchini;zucchini;Zucchini;count:1-3;sliced/diced|kale;kale;Kale;g;stems removed
        |bell pepper/bell peppers;bell pepper;Pepper;count:1-2;diced/sliced
        |green beans;green beans;Green Bean;g;trimmed|bok choy;bok choy;Bok Choy;g;quartered
        |peas;peas;Pea;cup;thawed|asparagus;asparagus;Asparagus;g;trimmed and chopped
        |corn kernels;corn;Corn;cup;|cucumber/cucumbers;cucumber;Cucumber;count:1-2;diced
        |beets;beets;Beet;g;roasted and diced|cherry tomatoes;tomatoes;Tomato;g;halved
        |cabbage;cabbage;Cabbage;g;shredded
        |fennel bulb/fennel bulbs;fennel;Fennel;count:1-2;sliced""",
    "aromatic": """onion/onions;onion;Onion;count:1-2;diced/chopped/thinly sliced
        |red onion/red onions;red onion;Red Onion;count:1-1;diced/thinly sliced
        |garlic;garlic;Garlic;clove;minced/crushed/thinly sliced
        |fresh ginger;ginger;Ginger;tbsp;grated|shallot/shallots;shallots;Shallot;count:1-3;minced
        |leek/leeks;leek;Leek;count:1-2;sliced
        |celery stalk/celery stalks;celery;Celery;count:1-3;diced
        |scallion/scallions;scallions;Scallion;count:2-4;sliced
        |green chili/green chilies;chili;Chili;count:1-2;finely chopped
        |lemongrass stalk/lemongrass stalks;lemongrass;Lemongrass;count:1-2;bruised""",
    "fat": """olive oil;olive oil;;tbsp;|butter;butter;;tbsp;|vegetable oil;oil;;tbsp;
        |sesame oil;sesame oil;;tsp;|ghee;ghee;;tbsp;|coconut oil;coconut oil;;tbsp;""",
    "spice": """ground cumin;cumin;;tsp;|ground coriander;coriander;;tsp;|turmeric;turmeric;;tsp;
        |smoked paprika;paprika;;tsp;|garam masala;garam masala;;tsp;
        |curry powder;curry powder;;tbsp;|chili flakes;chili flakes;;pinch;
        |dried oregano;oregano;;tsp;|dried thyme;thyme;;tsp;|ground cinnamon;cinnamon;;tsp;
        |saffron threads;saffron;;pinch;|gochujang;gochujang;;tbsp;
        |five-spice powder;five-spice;;tsp;|red curry paste;curry paste;;tbsp;
        |harissa;harissa;;tbsp;|green curry paste;curry paste;;tbsp;|za'atar;za'atar;;tsp;
        |chili powder;chili powder;;tsp;|ras el hanout;ras el hanout;;tsp;|berbere;berbere;;tbsp;
        |herbes de Provence;herbs;;tsp;|dried tarragon;tarragon;;tsp;|miso paste;miso;;tbsp;
        |soy sauce;soy sauce;;tbsp;|fish sauce;fish sauce;;tbsp;|mirin;mirin;;tbsp;
        |rice vinegar;vinegar;;tbsp;|oyster sauce;oyster sauce;;tbsp;|hoisin sauce;hoisin;;tbsp;
        |ground cardamom;cardamom;;tsp;|ground nutmeg;nutmeg;;pinch;
        |ground ginger;ginger;Ginger;tsp;|vanilla extract;vanilla;;tsp;
        |mustard powder;mustard;;tsp;""",
    "herb": """fresh basil;basil;;cupS;torn|fresh cilantro;cilantro;;cupS;chopped
        |fresh parsley;parsley;;cupS;chopped|fresh mint;mint;;cupS;chopped
        |fresh dill;dill;;tbsp;chopped|rosemary sprig/rosemary sprigs;rosemary;;count:1-3;
        |fresh chives;chives;;tbsp;snipped""",
    "finish": """lemon/lemons;lemon;Lemon;count:1-1;juiced/zested and juiced
        |lime/limes;lime;Lime;count:1-2;juiced/cut into wedges|grated parmesan;parmesan;;cup;
        |feta cheese;feta;;gs;crumbled|plain yogurt;yogurt;;cup;|sour cream;sour cream;;cup;
        |toasted sesame seeds;sesame seeds;;tbsp;|heavy cream;cream;;ml;
        |cheddar cheese;cheddar;Cheddar;gs;grated|avocado/avocados;avocado;;count:1-2;diced/sliced
        |salsa;salsa;;cup;|toasted pine nuts;pine nuts;;tbsp;
        |roasted peanuts;peanuts;;tbsp;chopped""",
    "liquid": """vegetable stock;stock;;ml;|chicken stock;stock;;ml;|beef stock;stock;;ml;
        |coconut milk;coconut milk;;ml;|crushed tomatoes;crushed tomatoes;;g;|water;water;;ml;
        |dry white wine;wine;;ml;|red wine;wine;;ml;|milk;milk;;ml;|buttermilk;buttermilk;;ml;""",
    "bake": """all-purpose flour;flour;;cupL;|bread flour;flour;;cupL;
        |whole wheat flour;flour;;cupL;|sugar;sugar;;cupS;|brown sugar;sugar;;cupS;
        |honey;honey;;tbsp;|instant yeast;yeast;;tsp;|baking powder;baking powder;;tsp;
        |baking soda;baking soda;;tsp;|unsalted butter;butter;;gs;melted/softened
        |egg/eggs;eggs;;count:2-3;|large egg/large eggs;eggs;;count:2-4;
        |powdered sugar;powdered sugar;;cupS;|corn tortilla/corn tortillas;tortillas;;count:6-12;
        |flour tortilla/flour tortillas;tortillas;;count:6-10;""",
    "flavor": """ripe banana/ripe bananas;bananas;Banana;count:2-3;mashed
        |cocoa powder;cocoa;Chocolate;cup;|blueberries;blueberries;Blueberry;cup;
        |dark chocolate;chocolate;Chocolate;g;chopped
        |apple/apples;apples;Apple;count:2-3;peeled and diced|ground almonds;almonds;Almond;cup;
        |orange/oranges;orange;Orange;count:1-2;zested and juiced
        |shredded coconut;coconut;Coconut;cup;|rolled oats;oats;Oat;cup;
        |walnuts;walnuts;Walnut;cup;chopped|pumpkin puree;pumpkin;Pumpkin;cup;
        |kalamata olives;olives;Olive;cup;pitted and chopped
        |fresh rosemary;rosemary;Rosemary;tbsp;|sunflower seeds;seeds;Sunflower Seed;cup;
        |raspberries;raspberries;Raspberry;cup;|grated carrot;carrot;Carrot;cup;
        |grated zucchini;zucchini;Zucchini;cup;squeezed dry|pear/pears;pears;Pear;count:2-3;diced
        |cranberries;cranberries;Cranberry;cup;dried""",
    "seasoning": """salt;salt;;tsp;|black pepper;pepper;;tsp;|red wine vinegar;vinegar;;tbsp;""",
}
# Quantity choices per kind, small to large ("_" stands for a space); servings pick the range.
QTY = {"cup": "1/2 3/4 1 1_1/2 2 3", "tbsp": "1 2 3", "tsp": "1/2 1 1_1/2 2", "pinch": "1 2"}
QTY |= {"g": "150 200 250 300 400 500 600 750", "kg": "1 1.5 2 2.5", "clove": "2 3 4 5 6"}
QTY |= {"ml": "150 250 400 500 750 1000", "cupL": "2 2_1/2 3", "cupS": "1/2 2/3 3/4 1"}
QTY |= {"gs": "100 115 125 150"}
UNIT = {"cupL": "cup", "cupS": "cup", "gs": "g"}
PLURAL = {"cup": "cups", "clove": "cloves", "pinch": "pinches"}
ING = {}
for _cat, _blob in CATALOG.items():
    for _entry in _blob.split("|"):
        _f, _s, _t, _k, _p = (x.strip() for x in " ".join(_entry.split()).split(";"))
        ING.setdefault(_f, (_cat, _s, _t, _k, [x for x in _p.split("/") if x]))

CUISINES = """
== Italian ; fat: olive oil|butter ; herb: fresh basil|fresh parsley
spices: dried oregano|chili flakes|dried thyme ; finish: grated parmesan|lemon/lemons
== Mexican
fat: vegetable oil|olive oil ; herb: fresh cilantro ; finish: lime/limes|sour cream|salsa
spices: ground cumin|chili powder|smoked paprika|dried oregano ; finish: avocado/avocados
== Indian
fat: ghee|vegetable oil ; herb: fresh cilantro|fresh mint ; finish: plain yogurt|lemon/lemons
spices: garam masala|turmeric|ground cumin|ground coriander|chili flakes|curry powder
== Thai ; fat: coconut oil|vegetable oil ; herb: fresh basil|fresh cilantro
spices: red curry paste|green curry paste|fish sauce|chili flakes ; finish: lime/limes
== Japanese ; fat: vegetable oil|sesame oil ; herb: fresh chives ; finish: toasted sesame seeds
spices: miso paste|soy sauce|mirin
== Chinese ; fat: vegetable oil|sesame oil ; herb: fresh cilantro ; finish: toasted sesame seeds
spices: five-spice powder|soy sauce|oyster sauce|hoisin sauce|chili flakes
== Korean ; fat: sesame oil|vegetable oil ; herb: fresh chives ; finish: toasted sesame seeds
spices: gochujang|soy sauce|rice vinegar
== French ; fat: butter|olive oil ; herb: fresh parsley|fresh chives|fresh dill
spices: herbes de Provence|dried thyme|dried tarragon ; finish: heavy cream|lemon/lemons
== Greek ; fat: olive oil ; herb: fresh dill|fresh mint|fresh parsley
spices: dried oregano|ground cinnamon ; finish: feta cheese|lemon/lemons|plain yogurt
== Moroccan ; fat: olive oil ; herb: fresh cilantro|fresh mint ; finish: lemon/lemons|plain yogurt
spices: ras el hanout|ground cumin|ground cinnamon|saffron threads|harissa
== Spanish ; fat: olive oil ; herb: fresh parsley ; finish: lemon/lemons
spices: smoked paprika|saffron threads|chili flakes
== Middle Eastern
fat: olive oil ; herb: fresh parsley|fresh mint ; finish: plain yogurt|lemon/lemons
spices: za'atar|ground cumin|ground coriander|ground cinnamon ; finish: toasted pine nuts
== Ethiopian ; fat: ghee|vegetable oil ; herb: fresh cilantro ; finish: lemon/lemons
spices: berbere|turmeric|ground cumin
== American ; fat: butter|vegetable oil ; herb: fresh parsley ; finish: cheddar cheese|sour cream
spices: smoked paprika|dried thyme|chili powder
== Vietnamese
fat: vegetable oil ; herb: fresh mint|fresh cilantro ; finish: lime/limes|roasted peanuts
spices: fish sauce|chili flakes|rice vinegar
== British
fat: butter|olive oil ; herb: fresh parsley|fresh chives ; finish: cheddar cheese|heavy cream
spices: dried thyme|mustard powder
"""
BAKE_CUISINES = "American, French, British, Scandinavian, Italian"
WEST = "onion/onions|garlic|shallot/shallots|leek/leeks|celery stalk/celery stalks"
WEST += "|red onion/red onions"
EAST = (
    "onion/onions|garlic|shallot/shallots|fresh ginger|green chili/green chilies|scallion/scallions"
)
EAST += "|lemongrass stalk/lemongrass stalks"
FIRM = {"potatoes", "sweet potatoes", "beets", "carrots", "squash"}
ASIAN = ("Thai", "Vietnamese", "Indian", "Korean", "Chinese", "Japanese")
SAVORY_DEFAULTS = {
    "fat": "*",
    "arom": "1-3 *",
    "spices": "0-2 *",
    "herb": ".5 *",
    "finish": "0-2 *",
}

DISHES = """
== soup ; titles: Soup ; adj: Velvety Warming ; cuisines: *
main: red lentils|green lentils|split peas|butternut squash|carrot/carrots|tomatoes|potatoes
main: sweet potatoes|mushrooms|cauliflower|chickpeas|white beans|chicken thighs|broccoli|leek/leeks
main: cabbage|peas ; liquid: vegetable stock|chicken stock|water|coconut milk ; extras: 0-2 VEG
?.5 Chop {main,extras} into bite-sized pieces.
Heat {fat} in a large pot over medium heat.
Add {arom} and cook for {3|4|5|6|8} minutes until {softened|soft|golden|translucent}.
+spices Stir in {spices} and cook for 1 minute until fragrant.
Add {main,extras} and pour in {liquid}.
Bring to a boil, then simmer for {15|20|25|30|35} minutes until the {.main} {be} tender.
?.5 Blend the soup until smooth. || Blend half of the soup and stir it back in.
Season with {=season} to taste.
+top Ladle into bowls and top with {top}. || Garnish with {top} and serve.
== stew ; titles: Stew, Casserole ; adj: Slow-Cooked Braised ; cuisines: Moroccan, French, Ethiopian
cuisines: Spanish, Greek, British, American, Indian, Mexican, Korean, Italian
main: beef chuck|lamb shoulder|pork shoulder|chicken thighs|chickpeas|white beans|green lentils
main: eggplant/eggplants|black beans|potatoes|sweet potatoes ; liquid2: .4 red wine
liquid: vegetable stock|chicken stock|beef stock|crushed tomatoes ; extras: 0-2 VEG
+meat ?.5 Season {main} with {=season}.
Heat {fat} in a heavy pot over medium-high heat.
+meat Sear {main} in batches for {5|6|8} minutes until browned, then set aside.
Add {arom} and cook for {5|6|8} minutes.
+spices Stir in {spices} and cook for 1 minute until fragrant.
+liquid2 Deglaze the pot with the wine, scraping up the browned bits.
+meat +extras Return {main} to the pot, add {extras} and pour in {liquid}.
+meat -extras Return {main} to the pot and pour in {liquid}.
-meat Add {main,extras} to the pot and pour in {liquid}.
+meat Cover and simmer gently for {90|120|150} minutes until the {.main} {be} tender.
-meat Cover and simmer gently for {25|30|40} minutes until the {.main} {be} tender.
Season with {=season} to taste.
+top Garnish with {top} and serve. || Serve topped with {top}.
== curry
titles: Curry ; adj: Fiery Coconut ; cuisines: Indian, Thai, Japanese, Vietnamese ; spices: 1-2 *
main: chicken thighs|chickpeas|cauliflower|paneer|shrimp|firm tofu|potatoes|red lentils|mushrooms
main: eggplant/eggplants|sweet potatoes|white fish fillets|lamb shoulder|butternut squash
liquid: coconut milk|coconut milk|crushed tomatoes|vegetable stock|chicken stock
extras: 0-2 spinach|peas|bell pepper/bell peppers|green beans|cherry tomatoes|bok choy
Heat {fat} in a deep pan over medium heat.
Add {arom} and cook for {4|5|6|7} minutes until {soft|golden}.
Stir in {spices} and cook for 1 minute until fragrant.
Add {main} and cook for {3|4|5|6} minutes, stirring to coat.
Pour in {liquid} and simmer for {12|15|20|25} minutes until the {.main} {be} cooked through.
+extras Stir in {extras} and cook for {2|3|5} more minutes.
Season with {=season} to taste.
+top Garnish with {top} and serve. || Serve over steamed rice, topped with {top}.
== stir-fry ; titles: Stir-Fry ; adj: Sticky Crispy Sizzling ; spices: 1-2 * ; coin: whisk .6
cuisines: Chinese, Thai, Korean, Japanese, Vietnamese
main: firm tofu|chicken breast|beef sirloin|shrimp|broccoli|mushrooms|pork tenderloin|green beans
main: bok choy|eggplant/eggplants|cabbage|asparagus
extras: 1-2 broccoli|bell pepper/bell peppers|bok choy|green beans|mushrooms|carrot/carrots
extras: cabbage|asparagus|corn kernels
+whisk Whisk {spices} with 2 tbsp of water in a small bowl.
Heat {fat} in a wok over high heat until shimmering.
Add {main} and stir-fry for {2|3|4|5} minutes until {browned|golden}, then remove.
Add {arom} and stir-fry for 30 seconds.
Toss in {extras} and cook for {2|3|4} minutes until crisp-tender.
+whisk Return {main} to the wok and pour over the sauce.
-whisk Return {main} to the wok with {spices}.
?.5 Toss everything together for 1 minute until glossy.
Season with {=season} to taste.
+top Garnish with {top} and serve.
== salad ; titles: Salad, Bowl ; adj: Crunchy Chopped ; cuisines: * ; fat: olive oil|vegetable oil
main: quinoa|farro|bulgur|couscous|chickpeas|green lentils|potatoes|beets|chicken breast|kale
main: cucumber/cucumbers|cherry tomatoes|white beans|halloumi|salmon fillets|black beans
main: fennel bulb/fennel bulbs ; arom: 0-1 red onion/red onions|scallion/scallions|shallot/shallots
extras: 1-2 cucumber/cucumbers|cherry tomatoes|kale|bell pepper/bell peppers|corn kernels
extras: fennel bulb/fennel bulbs|spinach|avocado/avocados ; spices: 0-1 *
acid: lemon/lemons|lime/limes|red wine vinegar|rice vinegar
finish: 0-1 feta cheese|toasted pine nuts|roasted peanuts|toasted sesame seeds|grated parmesan
+cup Simmer {main} in salted water for {12|15|20|25} minutes until tender, then drain and cool.
+meat Grill {main} for {3|4|5|6} minutes per side, then slice.
+firm Boil {main} for {12|15|20} minutes until tender, then drain.
+soft Chop {main} into bite-sized pieces.
Chop {extras,arom} and put them in a large bowl.
Whisk {fat,spices,acid} with the {=season} to make a dressing.
Add {main} to the bowl and pour over the dressing.
Toss gently to combine. || Toss well so everything is coated.
?.3 Let the salad rest for 10 minutes so the flavors meld.
+top Scatter over {top} before serving.
== pasta
titles: Pasta, @base ; adj: Silky Baked ; cuisines: Italian, American, Greek, French, Spanish
main: mushrooms|shrimp|zucchini/zucchini|Italian sausage|cherry tomatoes|spinach|chicken breast
main: broccoli|pancetta|salmon fillets|asparagus|kale|peas|eggplant/eggplants|butternut squash
base: PASTA ; liquid: .7 heavy cream|crushed tomatoes|dry white wine
extras: 0-1 spinach|kale|peas|cherry tomatoes|zucchini/zucchini
Bring a large pot of salted water to a boil.
Cook {base} for {8|9|10|11|12} minutes until al dente, then drain, reserving a cup of the water.
{Melt} {fat} in a large skillet over medium heat.
+meat Add {main} and cook for {4|5|6|8} minutes until browned.
-meat Add {main} and cook for {4|5|6|8} minutes until tender.
Add {arom,spices} and cook for 1 minute.
+liquid Pour in {liquid} and simmer for {3|5|8|10} minutes.
Toss {base} with the sauce, adding splashes of the reserved water as needed.
+extras Stir in {extras} until heated through.
Season with {=season} to taste.
+top Finish with {top} and serve.
== omelette ; titles: Omelette, Frittata ; adj: Fluffy Folded ; arom: 1-1 * ; spices: 0-1 *
cuisines: French, Spanish, American, Japanese, Italian, Greek, Indian, British
main: mushrooms|spinach|cheddar cheese|ham|cherry tomatoes|bell pepper/bell peppers|potatoes
main: zucchini/zucchini|asparagus|feta cheese|leek/leeks|kale ; base: large egg/large eggs
Whisk {base} with {=season} in a bowl.
-cheese Cook {main,arom} in half of {fat} for {3|4|5} minutes, then set aside.
+cheese Cook {arom} in half of {fat} for {3|4|5} minutes, then set aside.
{Melt} the rest of {fat} in a nonstick pan over medium heat.
+spices Pour in the eggs with {spices} and let them set for {30|45|60} seconds.
-spices Pour in the eggs and let them set for {30|45|60} seconds.
Stir gently, pulling the edges toward the center until mostly set.
Scatter {main,arom} over one half.
Fold the eggs over the filling and slide onto a plate. || Fold in half and cook for 30 seconds more.
+top Garnish with {top} and serve.
== tacos ; titles: Tacos ; adj: Crispy Charred Street-Style ; cuisines: Mexican, Korean, American
main: chicken thighs|ground beef|pork shoulder|white fish fillets|black beans|mushrooms|shrimp
main: cauliflower|sweet potatoes|halloumi
base: corn tortilla/corn tortillas|flour tortilla/flour tortillas
extras: 1-2 cabbage|red onion/red onions|cherry tomatoes|corn kernels|avocado/avocados
Toss {main} with {=spices,season}. || Toss {main} with {=spices,season} and rest for 15 minutes.
Heat {fat} in a skillet over medium-high heat.
Cook {main} for {5|6|8|10} minutes until browned.
Add {arom} and cook for {2|3} more minutes.
Warm {base} in a dry pan for 30 seconds per side.
Divide {main} among the tortillas and top with {extras}.
+top Finish with {top} and serve.
== risotto
titles: Risotto ; adj: Velvety Creamy ; cuisines: Italian, French, Spanish ; arom: 1-2 *
main: mushrooms|peas|butternut squash|asparagus|shrimp|spinach|Italian sausage|leek/leeks|beets
main: zucchini/zucchini|chicken thighs ; base: arborio rice ; cheese: grated parmesan
liquid: vegetable stock|chicken stock ; liquid2: .6 dry white wine ; finish: 0-1 *
Warm {liquid} in a saucepan and keep it at a gentle simmer.
{Melt} {fat} in a wide pan over medium heat.
Add {arom} and cook for {3|4|5} minutes until {soft|translucent}.
Stir in {base,spices} and toast for 2 minutes.
+liquid2 Pour in the wine and stir until absorbed.
Add the stock a ladle at a time, stirring until each is absorbed, for about {18|20|22} minutes.
Stir in {main} for the last {5|6|8} minutes of cooking.
Remove from the heat and beat in {cheese,finish}.
Season with {=season} to taste.
+herb Scatter over {herb} and rest for 2 minutes before serving.
== pilaf ; titles: Pilaf ; adj: Jeweled Fluffy ; cuisines: Middle Eastern, Indian, Greek, Moroccan
main: chickpeas|chicken thighs|carrot/carrots|green lentils|lamb shoulder|mushrooms|cauliflower
main: peas|shrimp|butternut squash ; base: basmati rice|long-grain rice|bulgur
liquid: vegetable stock|chicken stock|water
+base:rice ?.7 Rinse {base} until the water runs clear.
Heat {fat} in a heavy saucepan over medium heat.
Add {arom} and cook for {4|5|6} minutes until softened.
+meat Add {main} and cook for {4|5|6} minutes until browned.
Stir in {base,spices} and toast for 2 minutes.
+meat Pour in {liquid}, season with {=season} and bring to a boil.
-meat Add {main}, pour in {liquid}, season with {=season} and bring to a boil.
Cover and cook on low heat for {12|15|18} minutes.
Remove from the heat and let stand, covered, for 10 minutes.
+top Fluff with a fork, fold in {top} and serve.
-top Fluff with a fork and serve.
== roast
titles: Roast, Traybake ; adj: Crispy Charred Sunday ; cuisines: Italian, French, Greek, Moroccan
cuisines: American, British, Spanish, Middle Eastern, Mexican
main: whole chicken/whole chickens|pork loin|leg of lamb|beef topside|pork belly|cauliflower
main: potatoes|carrot/carrots|butternut squash|beets
extras: 0-2 potatoes|carrot/carrots|fennel bulb/fennel bulbs|sweet potatoes|butternut squash
extras: beets|cherry tomatoes ; liquid: .3 vegetable stock|chicken stock|dry white wine
Preheat the oven to {190|200|220}°C.
?.4 Pat {main} dry with paper towels.
Rub {main} with {fat,arom,spices}, then season with {=season}.
+extras Scatter {extras} in a roasting tin and set {main} on top.
+meat Roast for {60|75|90|100} minutes until cooked through.
-meat Roast for {30|35|40|45} minutes until tender and golden.
+meat ?.5 Baste with the pan juices halfway through.
+meat Rest {main} for {10|15|20} minutes before carving.
+liquid Pour {liquid} into the tin and simmer for 5 minutes to make a quick sauce.
+top Garnish with {top} and serve.
== skewers
titles: Skewers, Kebabs ; adj: Charred Sticky Grilled ; cuisines: Greek, Middle Eastern, Japanese
cuisines: Thai, Korean, Moroccan, Indian, American, Vietnamese ; acid: .6 lemon/lemons|lime/limes
main: chicken thighs|lamb shoulder|shrimp|firm tofu|halloumi|beef sirloin|paneer|pork shoulder
main: mushrooms|salmon fillets
extras: 1-2 bell pepper/bell peppers|zucchini/zucchini|red onion/red onions|cherry tomatoes
?.5 Cut {main} into 3 cm pieces.
Marinate {main} with {fat,arom,spices,acid,season} for {30|60|120} minutes.
?.4 Soak wooden skewers in water for 20 minutes.
Thread {main,extras} onto the skewers.
Preheat a grill or grill pan to high heat.
Grill for {8|10|12} minutes, turning occasionally, until charred.
+top Serve with {top}.
-top Serve hot.
== bread ; titles: Bread, Loaf ; adj: Crusty Rustic ; cuisines: BAKE ; servings: 8|10|12
main: kalamata olives|fresh rosemary|cheddar cheese|rolled oats|sunflower seeds|walnuts
flour: bread flour|whole wheat flour ; yeast: instant yeast ; sweet: .6 honey|sugar
fat: olive oil|unsalted butter ; liquid: water|milk ; season: salt
Combine {flour,yeast,sweet,season} in a large bowl.
Pour in the warm {.liquid} and {fat} and mix to a shaggy dough.
Knead for {8|10|12} minutes until smooth and elastic.
Work {main} into the dough. || Knead {main} into the dough until evenly spread.
Cover and let the dough rise for {60|75|90} minutes until doubled.
Shape into a loaf and place it on a lined baking tray.
Let the loaf proof for {30|40|45} minutes.
Preheat the oven to {200|210|220|230}°C.
Bake for {30|35|40} minutes until golden and hollow when tapped.
?.7 Cool on a wire rack before slicing.
== quickbread ; titles: Bread, Loaf ; adj: Moist Spiced ; cuisines: BAKE ; servings: 8|10|12
main: ripe banana/ripe bananas|pumpkin puree|grated zucchini|grated carrot|apple/apples|pear/pears
flour: all-purpose flour|whole wheat flour ; leaven: baking soda|baking powder ; season: salt
sugar: sugar|brown sugar ; butter: unsalted butter ; eggs: egg/eggs ; milk: .6 milk|buttermilk
spices: 0-2 ground cinnamon|ground cardamom|ground nutmeg|ground ginger
extras: 0-1 walnuts|cranberries|sunflower seeds ; vanilla: .5 vanilla extract
Preheat the oven to {170|175|180}°C and grease a loaf tin.
Whisk {flour,leaven,spices,season} in a bowl.
Beat {sugar,butter,eggs,milk,vanilla} in a second bowl.
Stir {main} into the wet ingredients.
Fold the dry ingredients into the wet until just combined.
+extras Fold in {extras}.
Pour the batter into the tin and bake for {50|55|60} minutes until a skewer comes out clean.
Cool in the tin for 10 minutes, then turn out onto a rack.
== cake ; titles: Cake, Loaf Cake ; adj: Moist Fluffy Iced ; cuisines: BAKE ; servings: 8|10|12
main: cocoa powder|dark chocolate|lemon/lemons|grated carrot|apple/apples|ground almonds|pear/pears
main: orange/oranges|shredded coconut|blueberries|ripe banana/ripe bananas|raspberries
flour: all-purpose flour ; leaven: baking powder ; sugar: sugar|brown sugar ; season: salt
butter: unsalted butter ; eggs: egg/eggs ; vanilla: .5 vanilla extract ; milk: .7 milk|buttermilk
spices: 0-1 ground cinnamon|ground cardamom|ground nutmeg|ground ginger ; icing: .4 powdered sugar
Preheat the oven to {170|175|180}°C and line a {20|22|23} cm cake tin.
Cream {butter,sugar} until pale and fluffy.
+vanilla Beat in {eggs} one at a time, then stir in {vanilla}.
-vanilla Beat in {eggs} one at a time.
Whisk {flour,leaven,spices,season} in a separate bowl.
+milk Fold the dry ingredients into the butter mixture, alternating with {milk}.
-milk Fold the dry ingredients into the butter mixture.
Fold in {main}.
Spread the batter in the tin and bake for {30|35|40|45} minutes.
Cool in the tin for 15 minutes before turning out.
+icing Dust the cooled cake with {icing}.
== muffins ; titles: Muffins ; adj: Bakery-Style Morning ; cuisines: BAKE ; servings: 12
main: blueberries|ripe banana/ripe bananas|dark chocolate|apple/apples|raspberries|rolled oats
main: pumpkin puree|cranberries|lemon/lemons|grated carrot|pear/pears ; season: salt
flour: all-purpose flour ; leaven: baking powder ; sugar: sugar|brown sugar ; eggs: egg/eggs
butter: unsalted butter ; milk: milk|buttermilk ; vanilla: .5 vanilla extract
spices: 0-2 ground cinnamon|ground cardamom|ground nutmeg|ground ginger
Preheat the oven to {190|200}°C and line a 12-hole muffin tin.
Whisk {flour,leaven,sugar,spices,season} in a large bowl.
Beat {butter,eggs,milk,vanilla} in a jug.
Pour the wet ingredients into the dry and stir until just combined.
Fold in {main}.
Divide the batter among the cases and bake for {18|20|22|25} minutes.
?.8 Cool in the tin for 5 minutes, then move to a rack.
"""
TIPS = """
*: Taste and adjust the seasoning just before serving.|Prep all the ingredients before you start.
*: Leftovers keep in the fridge for up to 3 days.|Swap the {.main} for {.alt} if you prefer.
soup: Make a double batch and freeze half for later.|A squeeze of lemon at the end brightens it.
stew: The stew tastes even better the next day.|Keep the simmer gentle so nothing catches.
curry: Toast the spices in the {.fat} to bring out their flavor.|Thin the sauce with water.
stir-fry: Have everything chopped before you heat the wok.|Cook the {.main} in batches.
salad: Dress the salad just before serving so it stays crisp.|Shake the dressing in a jar.
pasta: Save some pasta water; its starch helps the sauce cling.|Undercook the pasta by a minute.
omelette: Keep the heat moderate so the eggs stay tender.|Use a nonstick pan for an easy fold.
tacos: Char the tortillas over an open flame for extra flavor.|Let everyone build their own.
risotto: Keep the stock hot so the rice cooks evenly.|Stir often to release the starch.
pilaf: Toast the {.base} in the {.fat} first for a nuttier flavor.|Keep the lid on while it steams.
roast: Use a meat thermometer to check doneness.|Let the {.main} come to room temperature first.
skewers: Leave a little space between pieces so they cook evenly.|Oil the grill so nothing sticks.
bread: Use a kitchen scale for more consistent results.|Wrap the cooled loaf to keep it soft.
quickbread: Do not overmix the batter.|Toss the {.main} in a little flour so it does not sink.
cake: Let the butter soften before creaming.|Check the cake 5 minutes early, since ovens vary.
muffins: Do not overmix the batter or the muffins will be tough.|Fill the cases three-quarters full.
"""
ADJECTIVES = """Smoky Spicy Creamy Zesty Lemony Garlicky Herbed Rustic Golden Hearty Tangy Easy
    Weeknight Simple Classic Fragrant Quick Cozy Fresh Bright Peppery Savory Summer Winter Autumn
    Spring Country Homestyle Honeyed Toasty Vibrant One-Pot Everyday"""
BAKE_ADJ = "Golden Easy Simple Classic Cozy Spiced Honeyed Summer Autumn Country Homestyle"
TECHNIQUES = "knead fold sear deglaze whisk blend marinate proof cream baste thread brown rest"
ADJECTIVES, BAKE_ADJ, TECHNIQUES = (str.split(x) for x in (ADJECTIVES, BAKE_ADJ, TECHNIQUES))
ORDER = "base flour leaven yeast sugar sweet butter eggs main extras arom fat liquid liquid2 milk"
ORDER = (ORDER + " vanilla spices acid cheese herb finish icing season").split()


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
    files = build_files(args.n_train, args.n_val, args.seed)
    if args.check:
        bad = [
            name
            for name, data in files.items()
            if not (args.out_dir / name).is_file() or (args.out_dir / name).read_bytes() != data
        ]
        for name in bad:
            print(
                f"mismatch: {args.out_dir / name} is missing or differs from the generator output"
            )
        if not bad:
            print(f"ok: {', '.join(files)} in {args.out_dir} match the generator")
        return 1 if bad else 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (args.out_dir / name).write_bytes(data)
        print(f"wrote {args.out_dir / name} ({data.count(NL)} rows, {len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
