"""Data augmentation: training samples varied as they are drawn, reproducibly.

`data.augment` lists augmenters by registry name, each with a probability `p` and `options`.
When the trainer draws training example i in epoch e, `AugmentedDataset` takes the row it came
from, renders it for the task, and passes the rendering through each augmenter in order; an
augmenter applies with probability p. Every random choice comes from a `random.Random` seeded
by (seed, epoch, example, augmenter position) alone, so the same sample gets the same variant in
every run and on every resume, and a different one next epoch. The variant is then tokenized
like the original (`TokenDataset` layout and loss masks included). Validation data is never
augmented.

Built in:

- `template_variation` (instruction): render the sample with a template pair drawn at random
  from `data.templates` (plus `options.templates`, a list of {prompt, response}), instead of
  the one it is always given.
- `verb_paraphrase`: replace cooking verbs by a synonym from a word list (`options.words`:
  {verb: [synonyms]}, default `DEFAULT_VERBS`) where they give an instruction: at the start of
  a line (after a step number such as `3. `) or of a sentence, so "heat the oil" changes and
  "over medium heat" does not (`options.anywhere: true`: every whole-word match). The case of
  the first letter is kept. Applies to the part the model learns to write (the text, response
  or target).
- `recipe_tip`: add one `Tip: ...` line (from `options.tips`, default `DEFAULT_TIPS`) to the
  end of that part, after the recipe's own tips (the recipe data's layout).

Add your own with `register_augmenter`::

    @register_augmenter("shout")
    def make_shout(options):
        return lambda sample, rng: sample.with_target(sample.target.upper())
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from kiln.data.tasks import InstructionFormat, TaskFormat, render_template
from kiln.errors import DataError, KilnError
from kiln.registry import Registry, UnknownName

if TYPE_CHECKING:
    from kiln.config import AugmentConfig, RunConfig
    from kiln.data.dataset import TokenDataset

__all__ = [
    "AUGMENTERS",
    "DEFAULT_TIPS",
    "DEFAULT_VERBS",
    "AugmentedDataset",
    "Augmenter",
    "Sample",
    "build_augmenters",
    "register_augmenter",
    "tokenizer_for",
]


@dataclass(frozen=True)
class Sample:
    """A rendered training sample: its row and the task's parts (text / source, target / ...)."""

    row: Mapping[str, Any]
    index: int
    """The row's position in the training rows."""
    parts: tuple[str, ...]

    @property
    def target(self) -> str:
        """The part the model learns to write: the last one (text, target or response)."""
        return self.parts[-1]

    def with_target(self, text: str) -> Sample:
        """The sample with its last part replaced."""
        return replace(self, parts=(*self.parts[:-1], text))


class Augmenter(Protocol):
    """Returns a variant of `sample`, drawing every random choice from `rng`."""

    def __call__(self, sample: Sample, rng: random.Random) -> Sample: ...


AugmenterFactory = Callable[[Mapping[str, Any], TaskFormat], Augmenter]
AUGMENTERS: Registry[AugmenterFactory] = Registry("augmenter")
"""Augmenter factories by name: `factory(options, task_format) -> Augmenter`; `data.augment`
may also name one by import path, "package.module:factory"."""


def register_augmenter(
    name: str, *, replace: bool = False
) -> Callable[[AugmenterFactory], AugmenterFactory]:
    """Register `factory(options, task_format) -> Augmenter` under `name` (for data.augment);
    a taken name is refused unless `replace`."""
    return AUGMENTERS.register(name, replace=replace)


DEFAULT_VERBS: dict[str, list[str]] = {
    "chop": ["dice", "cut"],
    "dice": ["chop", "cube"],
    "slice": ["cut"],
    "mix": ["stir", "combine"],
    "stir": ["mix"],
    "combine": ["mix"],
    "whisk": ["beat"],
    "cook": ["heat"],
    "simmer": ["cook gently"],
    "bake": ["roast"],
    "roast": ["bake"],
    "saute": ["fry"],
    "fry": ["saute"],
    "toss": ["coat"],
    "serve": ["plate"],
    "add": ["put in"],
    "heat": ["warm"],
    "warm": ["heat"],
    "season": ["flavor"],
    "pour": ["add"],
}
"""verb_paraphrase's default word list: verb -> synonyms (lower case)."""

DEFAULT_TIPS: list[str] = [
    "Taste and adjust the seasoning just before serving.",
    "Prepare and measure every ingredient before you start cooking.",
    "Let the pan heat fully before adding the oil.",
    "Leftovers keep for up to 3 days in the fridge.",
    "Fresh herbs are best added at the very end.",
    "Rest the dish for a few minutes before serving.",
]
"""recipe_tip's default tips."""


def _option(options: Mapping[str, Any], name: str, default: Any, kind: type) -> Any:
    value = options.get(name, default)
    if not isinstance(value, kind):
        raise ValueError(f"options.{name} must be a {kind.__name__}, got {type(value).__name__}")
    return value


@register_augmenter("verb_paraphrase")
def _make_verb_paraphrase(options: Mapping[str, Any], fmt: TaskFormat) -> Augmenter:
    words = _option(options, "words", DEFAULT_VERBS, dict)
    table = {}
    for verb, synonyms in words.items():
        if (
            not isinstance(synonyms, list)
            or not synonyms
            or not all(isinstance(s, str) and s for s in synonyms)
        ):
            raise ValueError(f"options.words.{verb} must be a non-empty list of strings")
        table[str(verb).lower()] = synonyms
    if not table:
        raise ValueError("options.words must name at least one verb")
    anywhere = _option(options, "anywhere", False, bool)
    verbs = "|".join(map(re.escape, sorted(table, key=len, reverse=True)))
    # Imperative position: a line's start (after a step number such as "3. ") or a sentence's.
    lead = r"()" if anywhere else r"((?:^[ \t]*(?:\d+[.)][ \t]+)?)|(?<=[.!?;])[ \t]+)"
    pattern = re.compile(lead + r"\b(" + verbs + r")\b", re.I | re.M)

    def paraphrase(sample: Sample, rng: random.Random) -> Sample:
        def swap(m: re.Match[str]) -> str:
            word = m.group(2)
            new = rng.choice(table[word.lower()])
            return m.group(1) + (new[:1].upper() + new[1:] if word[:1].isupper() else new)

        return sample.with_target(pattern.sub(swap, sample.target))

    return paraphrase


@register_augmenter("recipe_tip")
def _make_recipe_tip(options: Mapping[str, Any], fmt: TaskFormat) -> Augmenter:
    tips = _option(options, "tips", DEFAULT_TIPS, list)
    if not tips or not all(isinstance(t, str) and t.strip() for t in tips):
        raise ValueError("options.tips must be a non-empty list of non-empty strings")

    def add_tip(sample: Sample, rng: random.Random) -> Sample:
        text = sample.target.rstrip()
        last = text.rsplit("\n", 1)[-1]
        sep = "\n" if last.startswith("Tip: ") else "\n\n"  # join the recipe's own tip block
        return sample.with_target(f"{text}{sep}Tip: {rng.choice(tips)}")

    return add_tip


@register_augmenter("template_variation")
def _make_template_variation(options: Mapping[str, Any], fmt: TaskFormat) -> Augmenter:
    extra = _option(options, "templates", [], list)
    pairs = list(fmt.templates) if isinstance(fmt, InstructionFormat) else []
    for i, t in enumerate(extra):
        if not isinstance(t, dict) or not {"prompt", "response"} <= t.keys():
            raise ValueError(f"options.templates[{i}] must be a mapping with prompt and response")
        pairs.append((str(t["prompt"]), str(t["response"])))
    if not isinstance(fmt, InstructionFormat) or len(pairs) < 2:
        raise ValueError(
            "needs task instruction and at least two template pairs (data.templates, "
            "or options.templates)"
        )

    def vary(sample: Sample, rng: random.Random) -> Sample:
        prompt, response = pairs[rng.randrange(len(pairs))]
        key = "data.augment.template_variation"
        parts = (
            render_template(prompt, sample.row, key, sample.index),
            render_template(response, sample.row, key, sample.index),
        )
        return replace(sample, parts=parts)

    return vary


def build_augmenters(
    specs: Sequence[AugmentConfig], fmt: TaskFormat
) -> list[tuple[float, Augmenter]]:
    """(probability, augmenter) for each `data.augment` entry.

    Raises:
        KilnError: an unknown name or bad options, naming `data.augment[i]`.
    """
    out = []
    for i, spec in enumerate(specs):
        try:
            factory = AUGMENTERS.get(spec.name)
        except UnknownName as exc:
            raise KilnError(f"data.augment[{i}].name: {exc}") from None
        try:
            out.append((spec.p, factory(spec.options, fmt)))
        except ValueError as exc:
            raise KilnError(f"data.augment[{i}] ({spec.name}): {exc}") from None
    return out


class AugmentedDataset:
    """Training examples re-rendered, augmented and re-tokenized as they are drawn.

    Index it through `for_epoch(epoch)`; example i of the base dataset comes from row
    `base.source_rows[i]`. A variant the tokenizer would drop (instruction: no room for a
    response) is replaced by the original example. Variants longer than the limits are cut as
    `data.truncation: true` cuts them, even when it is false: the original fitted, and a longer
    variant must not stop training.

    Args:
        base: the tokenized training examples (ragged).
        rows: the training rows they came from.
        fmt: the task format that rendered them.
        augmenters: (p, augmenter) pairs, applied in order.
        tokenize: tokenizes a list of rendered samples into a `TokenDataset` (same layout).
        seed: the run seed.
    """

    blocks = None
    doc_starts = None

    def __init__(
        self,
        base: TokenDataset,
        rows: Sequence[Mapping[str, Any]],
        fmt: TaskFormat,
        augmenters: Sequence[tuple[float, Augmenter]],
        tokenize: Callable[[list[tuple[str, ...]]], TokenDataset],
        seed: int,
    ) -> None:
        if base.blocks is not None:
            raise ValueError("augmentation needs unpacked (ragged) examples")
        self.base, self.rows, self.fmt = base, rows, fmt
        self.augmenters, self.tokenize, self.seed = list(augmenters), tokenize, seed
        self._source_rows = base.source_rows
        assert self._source_rows is not None

    def __len__(self) -> int:
        return len(self.base)

    @property
    def lengths(self) -> Tensor:
        """Lengths of the original examples (for length grouping)."""
        return self.base.lengths

    @property
    def num_tokens(self) -> int:
        """Target tokens of the original examples."""
        return self.base.num_tokens

    def without_documents(self) -> AugmentedDataset:
        return self

    def sample(self, index: int, epoch: int) -> Sample:
        """Example `index`'s rendered sample in `epoch`, after the augmenters."""
        row_index = int(self._source_rows[index])
        row = self.rows[row_index]
        sample = Sample(row, row_index, tuple(self.fmt.render(row, row_index)))
        for k, (p, augment) in enumerate(self.augmenters):
            # A string seed is hashed with SHA-512: stable across processes and platforms.
            rng = random.Random(f"{self.seed}:{epoch}:{index}:{k}")
            if rng.random() < p:
                sample = augment(sample, rng)
        return sample

    def examples(self, indices: Sequence[int], epoch: int) -> list[dict[str, Tensor]]:
        """The augmented examples at `indices` in `epoch` (one tokenizer call for the batch)."""
        samples = [self.sample(i, epoch).parts for i in indices]
        out: list[dict[str, Tensor]] = [self.base[i] for i in indices]  # fallbacks
        try:
            tokenized = self.tokenize(samples)
        except DataError:  # every variant dropped: keep the originals
            return out
        kept = tokenized.source_rows
        assert kept is not None
        for j, k in enumerate(kept.tolist()):
            out[k] = tokenized[j]
        return out

    def for_epoch(self, epoch: int) -> _EpochView:
        """Indexable view of the examples as drawn in `epoch` (what `Batcher` takes)."""
        return _EpochView(self, epoch)


class _EpochView:
    blocks = None
    doc_starts = None

    def __init__(self, data: AugmentedDataset, epoch: int) -> None:
        self.data, self.epoch = data, epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.data.examples([index], self.epoch)[0]

    def gather(self, indices: Tensor) -> list[dict[str, Tensor]]:
        """The examples at `indices`, tokenized in one call."""
        return self.data.examples(indices.tolist(), self.epoch)


def tokenizer_for(
    cfg: RunConfig, tokenizer: Any
) -> Callable[[list[tuple[str, ...]]], TokenDataset]:
    """Tokenize rendered samples as data preparation does (`tokenize_task`), cutting what is
    too long even under `data.truncation: false` (the original fitted; a longer variant must
    not stop training)."""
    from kiln.data.tokenize import tokenize_task

    def tokenize(parts: list[tuple[str, ...]]) -> TokenDataset:
        return tokenize_task(
            cfg.task, parts, tokenizer, cfg.data, truncation=True, what="augmented data", quiet=True
        )

    return tokenize
