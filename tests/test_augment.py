"""Augmentation: the built-in augmenters, determinism per (seed, epoch, sample), exact resume."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_resume_is_exact, bpe_tokenizer, make_rows, tiny_config, write_jsonl

from kiln import Trainer
from kiln.config import ConfigError, load_config
from kiln.data import build_datasets
from kiln.data.augment import (
    AUGMENTERS,
    AugmentedDataset,
    Sample,
    build_augmenters,
    register_augmenter,
    tokenizer_for,
)
from kiln.data.tasks import CausalFormat, InstructionFormat, make_format, render_rows
from kiln.errors import KilnError

RECIPE = (
    "Title: Lemon Rice\n\nIngredients:\n- 1 cup rice\n\nSteps:\n"
    "1. Chop the onion.\n2. Stir the rice and cook it.\n3. Serve."
)


def _spec(name: str, p: float = 1.0, **options: Any) -> Any:
    raw = {
        "model": {"arch": "gpt2"},
        "data": {
            "train": "x",
            "packing": False,
            "augment": [{"name": name, "p": p, "options": options}],
        },
        "train": {"max_steps": 2},
    }
    return load_config(data=raw).data.augment


def _apply(name: str, text: str = RECIPE, seed: int = 0, **options: Any) -> str:
    [(_, augment)] = build_augmenters(_spec(name, **options), CausalFormat())
    return augment(Sample({"text": text}, 0, (text,)), random.Random(seed)).target


def test_verb_paraphrase_swaps_whole_words_and_keeps_case() -> None:
    words = {"chop": ["dice"], "stir": ["mix"], "cook": ["heat"], "serve": ["plate"]}
    out = _apply("verb_paraphrase", words=words)
    # Verbs that start a step change; "cook" inside a sentence is not an instruction's verb.
    assert out.endswith("1. Dice the onion.\n2. Mix the rice and cook it.\n3. Plate.")
    assert out.replace("Dice", "Chop").replace("Mix", "Stir").replace("Plate", "Serve") == RECIPE
    text = "Heat the oil over medium heat. Stir well; stir again."
    assert _apply("verb_paraphrase", text, words={"heat": ["warm"], "stir": ["mix"]}) == (
        "Warm the oil over medium heat. Mix well; mix again."
    )
    everywhere = _apply("verb_paraphrase", text, words={"heat": ["warm"]}, anywhere=True)
    assert everywhere.startswith("Warm the oil over medium warm.")
    # Whole words only: "Chopped" or "cooker" are left alone.
    assert _apply("verb_paraphrase", "Chopped cooker", words={"chop": ["dice"]}) == "Chopped cooker"


def test_recipe_tip_appends_one_tip_line_in_the_recipe_layout() -> None:
    out = _apply("recipe_tip", tips=["Use day-old rice."])
    assert out == RECIPE + "\n\nTip: Use day-old rice."
    again = _apply("recipe_tip", out, tips=["Toast it first."])  # joins the existing tip block
    assert again == out + "\nTip: Toast it first."


def test_template_variation_renders_with_a_drawn_template() -> None:
    fmt = InstructionFormat((("Make {title}", "{steps}"), ("Recipe for {title}:", "{steps}")))
    [(_, augment)] = build_augmenters(_spec("template_variation"), fmt)
    row = {"title": "Soup", "steps": ["Boil."]}
    prompts = {
        augment(Sample(row, 0, fmt.render(row, 0)), random.Random(s)).parts[0] for s in range(20)
    }
    assert prompts == {"Make Soup", "Recipe for Soup:"}


def test_bad_augmenter_specs_name_the_entry() -> None:
    with pytest.raises(KilnError, match=r"data.augment\[0\].name: unknown augmenter 'nope'"):
        build_augmenters(_spec("nope"), CausalFormat())
    with pytest.raises(KilnError, match=r"data.augment\[0\] \(template_variation\): needs task"):
        build_augmenters(_spec("template_variation"), CausalFormat())
    with pytest.raises(KilnError, match=r"options.tips must be a non-empty list"):
        build_augmenters(_spec("recipe_tip", tips=[]), CausalFormat())


def test_augmentation_with_packing_is_a_config_error() -> None:
    raw = {
        "model": {"arch": "gpt2"},
        "data": {"train": "x", "augment": [{"name": "recipe_tip"}]},
        "train": {"max_steps": 2},
    }
    with pytest.raises(ConfigError, match=r"data\.augment: .* set data\.packing: false"):
        load_config(data=raw)


@pytest.fixture
def registered() -> Any:
    @register_augmenter("shout")
    def make(options, fmt):
        return lambda sample, rng: sample.with_target(sample.target.upper())

    yield
    AUGMENTERS.pop("shout")


def _run_cfg(tmp_path: Path, augment: list[dict[str, Any]], **sections: Any):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(40, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", make_rows(8, seed=2))
    data = {"packing": False, "augment": augment, **sections.pop("data", {})}
    return tiny_config(tmp_path, train, val, data=data, **sections)


def test_variants_are_fixed_per_seed_epoch_and_sample(tmp_path: Path, registered) -> None:
    cfg = _run_cfg(tmp_path, [{"name": "verb_paraphrase", "p": 0.5}, {"name": "shout", "p": 0.5}])
    trainer = Trainer(cfg)
    trainer.setup()
    aug = trainer.augmented
    assert isinstance(aug, AugmentedDataset)
    epoch0 = [aug.sample(i, 0).target for i in range(len(aug))]
    assert epoch0 == [aug.sample(i, 0).target for i in range(len(aug))]  # repeatable
    epoch1 = [aug.sample(i, 1).target for i in range(len(aug))]
    assert epoch0 != epoch1  # a new draw each epoch
    shouted = sum(t.isupper() for t in epoch0)
    assert 8 <= shouted <= 32  # p = 0.5 over 40 samples
    # The batch holds the variant's tokens, with the tokenizer's layout (EOS at the end).
    view = aug.for_epoch(0)
    i = next(i for i, t in enumerate(epoch0) if t.isupper())
    ids = view[i]["input_ids"].tolist()
    tok = trainer.tokenizer
    want = [*tok(epoch0[i], add_special_tokens=False)["input_ids"], tok.eos_token_id][:32]
    assert ids == want  # data.max_length = 32, as tokenize_causal cuts it
    assert ids != view.data.base[i]["input_ids"].tolist()


def test_instruction_augmented_run_keeps_the_loss_mask(tmp_path: Path) -> None:
    cfg = _run_cfg(
        tmp_path,
        [{"name": "template_variation", "p": 1.0}, {"name": "recipe_tip", "p": 1.0}],
        task="instruction",
        data={
            "templates": [
                {"prompt": "Recipe: {title}\n", "response": "{text}"},
                {"prompt": "Write a recipe for {title}.\n", "response": "{text}"},
            ],
            "max_length": 64,
        },
        train={"max_steps": 3},
    )
    trainer = Trainer(cfg)
    trainer.setup()
    tok = trainer.tokenizer
    view = trainer.augmented.for_epoch(0)
    for i in range(6):
        sample = trainer.augmented.sample(i, 0)
        example = view[i]
        n_prompt = len(tok(sample.parts[0], add_special_tokens=False)["input_ids"])
        labels = example["labels"].tolist()
        assert labels[:n_prompt] == [-100] * n_prompt
        assert -100 not in labels[n_prompt:]
    result = trainer.fit()
    assert len(result.loss_history) == 3


@pytest.mark.parametrize("stop_at", [2, 5])
def test_augmented_run_resumes_bit_exactly(tmp_path: Path, stop_at: int) -> None:
    def make(root: Path):
        root.mkdir(parents=True, exist_ok=True)
        return _run_cfg(
            root,
            [{"name": "verb_paraphrase", "p": 0.5}, {"name": "recipe_tip", "p": 0.3}],
            model={"dropout": 0.1},
            train={"max_steps": 8, "batch_size": 3, "grad_accum_steps": 2},
            eval={"every_steps": 3},
            log={"every_steps": 2},
        )

    assert_resume_is_exact(make, tmp_path, stop_at)


_TASK_DATA: dict[str, dict[str, Any]] = {
    "causal_lm": {},
    "instruction": {"prompt_template": "Recipe: {title}\n", "response_template": "{text}"},
    "seq2seq": {"source_template": "{title}", "target_template": "{text}", "max_target_length": 24},
}


@pytest.mark.parametrize("task", sorted(_TASK_DATA))
def test_augmentation_tokenizes_a_row_as_data_preparation_does(tmp_path: Path, task: str) -> None:
    rows = make_rows(12, seed=3)
    rows[1]["text"] *= 4  # longer than max_length: cut the same way on both paths
    rows[2]["title"] = "very long title " * 20  # instruction: no room for a response, dropped
    data = {"packing": False, "max_length": 32, **_TASK_DATA[task]}
    model = {"arch": "t5"} if task == "seq2seq" else {}
    cfg = tiny_config(tmp_path, tmp_path / "unused.jsonl", None, task=task, data=data, model=model)
    tok = bpe_tokenizer([r["text"] for r in rows])
    prepared, _, _ = build_datasets(cfg, tok, rows, [])
    fmt = make_format(cfg)
    # The function augmentation tokenizes its variants with, given the unchanged renderings.
    retokenized = tokenizer_for(cfg, tok)(render_rows(fmt, rows))
    assert len(retokenized) == len(prepared) == (11 if task == "instruction" else 12)
    for i in range(len(prepared)):
        want, got = prepared[i], retokenized[i]
        assert want.keys() == got.keys()
        for key in want:
            assert got[key].tolist() == want[key].tolist(), (i, key)
    # And through AugmentedDataset, with an augmenter that changes nothing.
    calls: list[int] = []

    def tokenize(parts: list[tuple[str, ...]]) -> Any:
        calls.append(len(parts))
        return tokenizer_for(cfg, tok)(parts)

    same = AugmentedDataset(prepared, rows, fmt, [(1.0, lambda s, rng: s)], tokenize, cfg.seed)
    batch = same.for_epoch(0).gather(torch.arange(len(prepared)))
    assert calls == [len(prepared)]
    for i, example in enumerate(batch):
        assert {k: v.tolist() for k, v in example.items()} == {
            k: v.tolist() for k, v in prepared[i].items()
        }
