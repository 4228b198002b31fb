"""Configs in Python: validated edits, the frozen message, presets in the constructor, defaults
for a run given its own model and data, YAML round trip, batch and token arithmetic."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kiln.config import (
    PRESETS,
    ConfigError,
    FrozenConfigError,
    OptimConfig,
    RunConfig,
    TrainConfig,
    config_hash,
    load_config,
)

BASE = {
    "model": {"arch": "gpt2", "hidden_size": 32, "num_layers": 2, "num_heads": 2},
    "data": {"train": "train.jsonl"},
    "train": {"max_steps": 10},
}


def cli_problems(*overrides: str) -> list[str]:
    """What the CLI path (load_config + overrides) reports for `overrides` on BASE."""
    with pytest.raises(ConfigError) as info:
        load_config(data=BASE, overrides=list(overrides))
    return info.value.problems


def test_replace_edits_a_copy_through_dotted_keys_and_strings() -> None:
    cfg = load_config(data=BASE)
    new = cfg.replace("optim.lr=1e-3", "optim.betas=[0.9,0.95]", seed=7, **{"train.batch_size": 32})
    assert (new.train.batch_size, new.optim.lr, new.optim.betas, new.seed) == (
        32,
        1e-3,
        (0.9, 0.95),
        7,
    )
    assert (cfg.train.batch_size, cfg.optim.lr, cfg.seed) == (8, 3e-4, 42)  # unchanged
    assert new.train.max_steps == 10  # the rest is kept
    assert new.model == cfg.model
    assert new == load_config(
        data=BASE,
        overrides=["optim.lr=1e-3", "optim.betas=[0.9,0.95]", "seed=7", "train.batch_size=32"],
    )
    assert cfg.train.replace(batch_size=4) == cfg.train.model_copy(update={"batch_size": 4})


@pytest.mark.parametrize(
    "override",
    [
        "train.batch_size=-5",
        "train.batch_sizee=3",
        "optim.warmup_steps=10",  # cross-section: must be < train.max_steps
        "train.precision=fp8",
        "optim.lr",
    ],
)
def test_replace_refuses_what_the_cli_refuses_with_the_same_lines(override: str) -> None:
    cfg = load_config(data=BASE)
    expected = cli_problems(override)
    with pytest.raises(ConfigError) as info:
        cfg.replace(override)
    assert info.value.problems == expected
    if "=" in override:  # the keyword form says the same
        key, _, value = override.partition("=")
        typed = {"-5": -5, "3": 3, "10": 10, "1": 1}.get(value, value)
        with pytest.raises(ConfigError) as info:
            cfg.replace(**{key: typed})
        assert info.value.problems == expected


def test_constructors_report_problems_as_the_cli_does() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig(train={"batch_size": -5}, optim={"lr": 0}, bogus=1)
    assert info.value.problems == [
        "optim.lr: input should be greater than 0 (got 0)",
        "train.batch_size: input should be greater than 0 (got -5)",
        "bogus: unknown key",
    ]
    with pytest.raises(ConfigError) as info:
        TrainConfig(batch_size=-5)
    assert info.value.problems == ["train.batch_size: input should be greater than 0 (got -5)"]
    with pytest.raises(ConfigError, match=r"^optim\.warmup_steps: must be < train\.max_steps"):
        RunConfig(train={"max_steps": 10}, optim={"warmup_steps": 10})


def test_replace_names_the_full_key_on_a_section() -> None:
    cfg = load_config(data=BASE)
    with pytest.raises(ConfigError) as info:
        cfg.train.replace(batch_size=-5)
    assert info.value.problems == ["train.batch_size: input should be greater than 0 (got -5)"]
    with pytest.raises(ConfigError) as info:
        cfg.replace(**{"seed.x": 1})
    assert info.value.problems == ["seed: is a value, not a section"]
    with pytest.raises(ConfigError, match=r"^train\.anomaly\.spike\.sigma: input should be"):
        cfg.train.anomaly.spike.replace(sigma=0)


def test_assignment_says_how_to_edit() -> None:
    cfg = load_config(data=BASE)
    with pytest.raises(FrozenConfigError) as info:
        cfg.train.batch_size = 32  # type: ignore[misc]
    assert str(info.value) == (
        "TrainConfig is frozen (immutable): make an edited, validated copy with "
        "cfg.replace(**{'train.batch_size': 32})"
    )
    assert isinstance(info.value, AttributeError)
    with pytest.raises(FrozenConfigError, match=r"cfg\.replace\(seed=3\)"):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(FrozenConfigError, match=re.escape("'eval.generate.top_p': 0.5")):
        cfg.eval.generate.top_p = 0.5  # type: ignore[misc]
    with pytest.raises(FrozenConfigError, match="frozen"):
        del cfg.optim.lr
    assert (cfg.train.batch_size, cfg.seed, cfg.optim.lr) == (8, 42, 3e-4)


def test_model_copy_validates() -> None:
    cfg = load_config(data=BASE)
    with pytest.raises(ConfigError) as info:
        cfg.train.model_copy(update={"batch_size": -5})
    assert info.value.problems == ["train.batch_size: input should be greater than 0 (got -5)"]
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps: must be < train\.max_steps"):
        cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"warmup_steps": 50})})
    with pytest.raises(ConfigError, match="bogus: unknown key"):
        cfg.model_copy(update={"bogus": 1})
    deep = cfg.model_copy(update={"seed": 1}, deep=True)
    assert deep.seed == 1
    assert deep.train == cfg.train
    assert deep.train is not cfg.train
    assert cfg.model_copy() == cfg


def test_preset_applies_in_the_constructor_as_in_a_file() -> None:
    for name in PRESETS:
        assert RunConfig(preset=name) == load_config(data={"preset": name}, complete=False)
    cfg = RunConfig(preset="fast")
    assert cfg.optim.lr == PRESETS["fast"]["optim"]["lr"]
    assert (cfg.train.max_steps, cfg.eval.every_steps) == (100, 50)
    # Your values win; a section given as a dict is laid over the preset's.
    cfg = RunConfig(preset="baseline", optim={"lr": 1e-3}, train={"max_steps": 300})
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (1e-3, 50)
    assert (cfg.train.max_steps, cfg.train.grad_clip) == (300, 1.0)
    with pytest.raises(ConfigError) as info:
        RunConfig(preset="turbo")  # type: ignore[arg-type]
    assert info.value.problems == [
        "preset: unknown preset 'turbo' (expected one of fast, baseline, quality)"
    ]


def test_an_edit_does_not_apply_the_preset_again() -> None:
    # A section given as an object is taken whole: the preset's warmup does not fill it...
    cfg = RunConfig(preset="baseline", optim=OptimConfig(lr=1e-3))
    assert cfg.optim.warmup_steps == 0
    # ... nor does an edit of another value, or of that section, bring it back.
    assert cfg.replace(seed=1).optim == cfg.optim
    assert cfg.replace(**{"optim.lr": 2e-3}).optim.warmup_steps == 0
    assert cfg.model_copy(update={"seed": 1}).optim == cfg.optim
    # Naming another preset in an edit would change nothing but the name: refused.
    with pytest.raises(ConfigError, match=r"^preset: a preset applies when a config is built"):
        cfg.replace(preset="fast")
    assert cfg.replace(preset=None).optim == cfg.optim


def test_defaults_are_a_run_given_its_model_and_data() -> None:
    cfg = RunConfig()
    assert (cfg.model.name_or_path, cfg.model.arch, cfg.data.train) == (None, None, None)
    assert (cfg.train.num_epochs, cfg.train.max_steps) == (1.0, None)
    assert RunConfig(train={"batch_size": 4}).train.num_epochs == 1.0
    assert TrainConfig(max_steps=5).num_epochs is None  # a set length is never overridden
    cfg.require_sources(model_given=True, data_given=True)
    with pytest.raises(ConfigError) as info:
        cfg.require_sources()
    assert info.value.problems == [
        "model: set model.name_or_path or model.arch, or pass a model to the Trainer",
        "data.train: set the training data, or pass train_data to the Trainer",
    ]
    load_config(data=BASE).require_sources()
    with pytest.raises(ConfigError, match=r"^model: set exactly one .* not both$"):
        RunConfig(model={"arch": "gpt2", "name_or_path": "gpt2"})


def test_the_cli_still_requires_a_whole_run() -> None:
    assert cli_problems("model.arch=null") == [
        "model: set exactly one of model.name_or_path or model.arch"
    ]
    assert cli_problems("data.train=null") == ["data.train: required key is missing"]
    assert cli_problems("train.max_steps=null") == [
        "train: set train.max_steps or train.num_epochs"
    ]
    with pytest.raises(ConfigError) as info:
        load_config(data={})
    assert info.value.problems == [
        "model: required key is missing",
        "data: required key is missing",
        "train: required key is missing",
    ]
    assert load_config(data={}, complete=False) == RunConfig()


def test_replace_keeps_which_keys_were_set() -> None:
    # token-id data reads tokenizer.vocab_size only when it was set (data/assemble.py)
    cfg = RunConfig(tokenizer={"min_frequency": 3})
    new = cfg.replace(**{"tokenizer.min_frequency": 4})
    assert new.tokenizer.model_fields_set == {"min_frequency"}
    assert cfg.replace(seed=3).tokenizer.model_fields_set == {"min_frequency"}


def test_yaml_round_trip(tmp_path: Path) -> None:
    for cfg in (RunConfig(), RunConfig(preset="quality"), load_config(data=BASE)):
        text = cfg.to_yaml()
        assert RunConfig.from_yaml(text) == cfg
        path = tmp_path / "c.yaml"
        path.write_text(text)
        assert RunConfig.from_yaml(path) == cfg
        assert RunConfig.from_yaml(str(path)) == cfg
        assert config_hash(RunConfig.from_yaml(path)) == config_hash(cfg)
    assert RunConfig.from_yaml("") == RunConfig()
    assert RunConfig.from_yaml("preset: fast") == RunConfig(preset="fast")
    assert RunConfig.from_yaml("{seed: 3}").seed == 3
    with pytest.raises(ConfigError, match=r"^train\.batch_size: input should be greater than 0"):
        RunConfig.from_yaml("train:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        RunConfig.from_yaml(str(tmp_path / "missing.yaml"))
    # The CLI refuses a Python-only config file: it names no model and no data.
    path.write_text(RunConfig().to_yaml())
    with pytest.raises(ConfigError, match="model: set exactly one"):
        load_config(path)


@pytest.mark.parametrize(
    ("task", "packing", "world_size"),
    [("causal_lm", True, 1), ("causal_lm", False, 4), ("seq2seq", False, 2)],
)
def test_batch_arithmetic_matches_config_explain(task: str, packing: bool, world_size: int) -> None:
    from kiln.explain import explain

    arch = "t5" if task == "seq2seq" else "gpt2"
    cfg = load_config(
        data=BASE,
        overrides=[
            f"task={task}",
            f"model.arch={arch}",
            f"data.packing={str(packing).lower()}",
            "train.batch_size=3",
            "train.grad_accum_steps=5",
            "data.max_length=64",
            "data.max_target_length=16",
        ],
    )
    assert cfg.effective_batch_size(world_size) == 3 * 5 * world_size
    text = explain(cfg, world_size=world_size)
    batch = re.search(r"effective batch size: +(\d+) sequences", text)
    tokens = re.search(r"tokens per optimizer step: +(?:up to )?([\d,]+)", text)
    assert batch, text
    assert tokens, text
    assert int(batch.group(1)) == cfg.effective_batch_size(world_size)
    assert int(tokens.group(1).replace(",", "")) == cfg.tokens_per_step(world_size)
    assert cfg.tokens_per_step() == 15 * (64 + (16 if task == "seq2seq" else 0))


def test_the_docs_example_runs() -> None:
    text = (Path(__file__).parents[1] / "docs" / "python.md").read_text()
    section = text.split("## Configs in Python", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "cfg.replace" in block
    exec(compile(block, "docs/python.md", "exec"), {})
