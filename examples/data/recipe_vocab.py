"""Vocabulary and step-template tables for ``make_recipes.py`` (data only, no logic).

``CATALOG`` lists the ingredients of each category, ``QTY``/``UNIT``/``PLURAL`` their quantities,
``CUISINES`` the per-cuisine default pools, ``DISHES`` one block per dish, and ``TIPS`` the tips.
A dish block picks the ingredients of each role and lists step templates; ``{role}`` renders
"the <names>", ``{=role}`` the names without "the", ``{.role}`` the first name alone, ``{a|b}`` a
random choice; a line prefixed ``+flag``/``-flag`` is kept only if the flag (a non-empty role,
``meat``, ``cup``, ...) is set/unset, ``?p`` keeps it with probability p, and ``a || b`` picks one
of two whole sentences.

Editing these tables changes the generated dataset, so ``make_recipes.py --check`` then fails until
the shipped files are regenerated.
"""

from __future__ import annotations

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
