"""task: preference: DPO against a frozen reference (or LoRA's adapters disabled), checked
against TRL's DPOTrainer; pairs tokenized as TRL tokenizes them; bad pairs named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln import Trainer, load_config
from kiln.data.collate import IGNORE_INDEX, collate_preference
from kiln.data.preference import PreferenceDataset, PreferenceFormat, tokenize_preference
from kiln.errors import DataError
from tests.helpers import bpe_tokenizer, reference_args, saved_gpt2, write_jsonl


def pairs(n: int) -> list[dict[str, str]]:
    """Text pairs: a recipe step as chosen, the same step garbled as rejected."""
    verbs = ["Chop", "Stir", "Simmer", "Bake", "Whisk", "Season"]
    out = []
    for i in range(n):
        verb = verbs[i % len(verbs)]
        out.append(
            {
                "prompt": f"Step {i} of the soup:",
                "chosen": f" {verb} the onions for {i + 2} minutes.",
                "rejected": f" {verb} onions the minutes {i + 2} for." + " Again." * (i % 3),
            }
        )
    return out


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    corpus = [" ".join(p.values()) for p in pairs(60)]
    return bpe_tokenizer(corpus, vocab_size=360)


def test_pairs_are_tokenized_as_trl_does(tokenizer) -> None:
    rows = pairs(4)
    rendered = [PreferenceFormat().render(r, i) for i, r in enumerate(rows)]
    data = PreferenceDataset(tokenize_preference(rendered, tokenizer, 512))
    assert len(data) == 4
    eos = tokenizer.eos_token
    for i, row in enumerate(rows):
        example = data[i]
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        for side, key in (("", "chosen"), ("rejected_", "rejected")):
            whole = tokenizer(row["prompt"] + row[key] + eos, add_special_tokens=False)["input_ids"]
            assert example[f"{side}input_ids"].tolist() == whole
            labels = example[f"{side}labels"].tolist()
            n = len(prompt)  # the prompt is a prefix here: no merge at the boundary
            assert whole[:n] == prompt
            assert labels == [IGNORE_INDEX] * n + whole[n:]
            assert labels[-1] == tokenizer.eos_token_id
    batch = collate_preference([data[0], data[1]], pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # chosen 0, chosen 1, rejected 0, rejected 1
    assert batch["input_ids"][2, : len(data[0]["rejected_input_ids"])].tolist() == (
        data[0]["rejected_input_ids"].tolist()
    )


def test_truncation_keeps_the_start_and_drops_a_pair_without_room(tokenizer) -> None:
    rows = pairs(3)
    rows[1] = {**rows[1], "prompt": "Step one two three four five six seven eight nine:" * 3}
    rendered = [PreferenceFormat().render(r, i) for i, r in enumerate(rows)]
    prompt_len = len(tokenizer(rows[1]["prompt"], add_special_tokens=False)["input_ids"])
    data = PreferenceDataset(tokenize_preference(rendered, tokenizer, prompt_len, quiet=True))
    assert len(data) == 2
    assert data.source_rows.tolist() == [0, 2]
    assert all(len(data[i]["input_ids"]) <= prompt_len for i in range(2))
    with pytest.raises(DataError, match=r"pair 1: \d+ tokens \(prompt \+ completion\) exceed"):
        tokenize_preference(rendered, tokenizer, prompt_len, truncation=False)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "rejected": "r"}, "missing field 'chosen'"),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "field 'chosen' is empty"),
        ({"prompt": "p", "chosen": ["x"], "rejected": "r"}, "all be strings or all be message"),
        (
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "b"}],
            },
            "rejected must end with an assistant message",
        ),
        (
            {
                "prompt": [{"role": "cook", "content": "hi"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            r"prompt\[0\]\.role: unknown role 'cook'",
        ),
        (
            {"prompt": [], "chosen": [{"role": "assistant", "content": "a"}], "rejected": []},
            "field 'prompt' is an empty conversation",
        ),
    ],
)
def test_bad_pairs_are_named(row: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=message):
        PreferenceFormat().render(row, 7)


def test_chat_form_pairs_use_the_template(tokenizer) -> None:
    from kiln.data.chat import set_chat_template

    tok = bpe_tokenizer([" ".join(p.values()) for p in pairs(60)], vocab_size=360)
    set_chat_template(tok, "chatml")
    row = {
        "prompt": [{"role": "user", "content": "Step 1 of the soup:"}],
        "chosen": [{"role": "assistant", "content": "Chop the onions."}],
        "rejected": [{"role": "assistant", "content": "Onions chop the."}],
    }
    data = PreferenceDataset(tokenize_preference([PreferenceFormat().render(row, 0)], tok, 512))
    example = data[0]
    targets = [
        t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab >= 0
    ]
    assert tok.decode(targets) == "Chop the onions.<|im_end|>\n"


def _model_dirs(tmp_path: Path, tokenizer: Any) -> tuple[Path, Path]:
    return saved_gpt2(tmp_path, tokenizer)


def dpo_raw(
    tmp_path: Path, train: Path, model: Path, tok: Path, *, steps: int, batch: int, lr: float
) -> dict[str, Any]:
    return {
        "name": "dpo",
        "output_dir": str(tmp_path / "run"),
        "task": "preference",
        "model": {"name_or_path": str(model)},
        "tokenizer": {"name_or_path": str(tok)},
        "data": {"train": str(train), "val_split": 0, "cache_dir": None, "dedup": False},
        "optim": {
            "lr": lr,
            "scheduler": "constant",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
        },
        "train": {
            "max_steps": steps,
            "batch_size": batch,
            "grad_clip": 1.0,
            "precision": "fp32",
            "dpo": {"beta": 0.1},
        },
        "log": {"every_steps": 1, "progress": "none", "plots": False},
    }


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_equals_trl_dpo_trainer(tmp_path: Path, tokenizer, loss_type: str) -> None:
    """The same tiny GPT-2, eight pairs, beta, lr and full batch (so the sampler's order does
    not matter): kiln's loss and reward metrics per step equal TRL's DPOTrainer to 1e-5
    relative over 10 steps, and the final weights to 1e-4."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import GPT2LMHeadModel
    from trl import DPOConfig, DPOTrainer

    model_dir, tok_dir = _model_dirs(tmp_path, tokenizer)
    rows = pairs(8)
    steps, lr = 10, 1e-3
    args = DPOConfig(
        **reference_args(tmp_path / "trl", batch=8, steps=steps, lr=lr),
        beta=0.1,
        loss_type=[loss_type],
        max_length=None,
    )
    trl = DPOTrainer(
        model=GPT2LMHeadModel.from_pretrained(model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trl.train()
    theirs = [h for h in trl.state.log_history if "loss" in h]
    assert len(theirs) == steps

    raw = dpo_raw(
        tmp_path,
        write_jsonl(tmp_path / "p.jsonl", rows),
        model_dir,
        tok_dir,
        steps=steps,
        batch=8,
        lr=lr,
    )
    raw["train"]["dpo"]["loss_type"] = loss_type
    trainer = Trainer(load_config(data=raw))
    result = trainer.fit()
    ours = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    ours = [r for r in ours if r.get("split") == "train"]
    assert [r["loss"] for r in ours] == pytest.approx([h["loss"] for h in theirs], rel=1e-5)
    for name in METRICS:
        assert [r[name] for r in ours] == pytest.approx(
            [h[name] for h in theirs], rel=1e-5, abs=1e-6
        ), name
    assert result.loss_history[-1] < result.loss_history[0]  # it learned
    params = dict(trainer.model.named_parameters())
    for name, value in trl.model.named_parameters():
        assert torch.allclose(params[name], value, atol=1e-4, rtol=0), name


def test_dpo_with_lora_uses_the_base_as_reference_and_saves_a_peft_adapter(
    tmp_path: Path, tokenizer
) -> None:
    pytest.importorskip("peft")
    model_dir, tok_dir = _model_dirs(tmp_path, tokenizer)
    raw = dpo_raw(
        tmp_path,
        write_jsonl(tmp_path / "p.jsonl", pairs(16)),
        model_dir,
        tok_dir,
        steps=4,
        batch=4,
        lr=5e-3,
    )
    raw["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    trainer = Trainer(load_config(data=raw))
    result = trainer.fit()
    assert trainer.parts.objective.reference is None  # no copy: adapters off is the reference
    first = json.loads((tmp_path / "run" / "metrics.jsonl").open().readline())
    # Step 1 starts from adapters that change nothing: policy == reference, rewards 0.
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-5)  # -log sigmoid(0)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    adapted = PeftModel.from_pretrained(base, result.final_dir)
    assert adapted.peft_config["default"].r == 4


def test_a_preference_run_validates_with_reward_accuracy(tmp_path: Path, tokenizer) -> None:
    model_dir, tok_dir = _model_dirs(tmp_path, tokenizer)
    train = write_jsonl(tmp_path / "p.jsonl", pairs(24))
    raw = dpo_raw(tmp_path, train, model_dir, tok_dir, steps=6, batch=4, lr=5e-3)
    raw["data"]["val_split"] = 0.25
    raw["eval"] = {"every_steps": 3}
    raw["checkpoint"] = {"keep_best": 1, "metric": "val_rewards/accuracies", "mode": "max"}
    result = Trainer(load_config(data=raw)).fit()
    val = result.metrics[-1]
    assert set(val) >= {"val_loss", "val_rewards/accuracies", "val_rewards/margins"}
    assert 0.0 <= val["val_rewards/accuracies"] <= 1.0
    assert val["val_pairs"] == 6
    raw["checkpoint"]["metric"] = "val_ppl"
    with pytest.raises(Exception, match="task preference validates val_loss"):
        load_config(data=raw)


def scratch_raw(tmp_path: Path, name: str, batch: int, **train: Any) -> dict[str, Any]:
    """A from-scratch tiny GPT-2 on 48 pairs (8 held out), as the CLI would run it."""
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        tmp_path.mkdir(parents=True, exist_ok=True)
        write_jsonl(data, pairs(48))
    return {
        "name": name,
        "output_dir": str(tmp_path / name),
        "seed": 0,
        "task": "preference",
        "model": {"arch": "gpt2", "hidden_size": 32, "num_layers": 2, "num_heads": 2},
        "tokenizer": {"vocab_size": 320},
        "data": {"train": str(data), "val_split": 0.17, "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "scheduler": "constant"},
        "train": {"max_steps": 6, "batch_size": batch, "num_threads": 1, **train},
        "eval": {"every_steps": 3},
        "checkpoint": {"every_steps": 3},
        "log": {"every_steps": 1, "progress": "none", "plots": False},
    }


def test_a_dpo_run_resumes_bit_exactly(tmp_path: Path) -> None:
    from tests.helpers import assert_resume_is_exact

    def make(root: Path) -> Any:
        return load_config(data=scratch_raw(root, "run", 4))

    ref, resumed = assert_resume_is_exact(make, tmp_path, stop_at=3)
    # The reference came back as the model was built, not as the checkpoint left it.
    for name, value in ref.parts.objective.reference.state_dict().items():
        assert torch.equal(value, resumed.parts.objective.reference.state_dict()[name]), name
    rows = [json.loads(x) for x in (tmp_path / "ref" / "run" / "metrics.jsonl").open()]
    cut = [json.loads(x) for x in (tmp_path / "cut" / "run" / "metrics.jsonl").open()]
    assert [r.get("rewards/margins") for r in cut] == [r.get("rewards/margins") for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_dpo_on_two_ranks_equals_one_with_the_same_global_batch(
    tmp_path: Path, strategy: str
) -> None:
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    from kiln.cli import main
    from tests.helpers import ROOT, free_port, gloo_env

    def config(name: str, batch: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        raw = scratch_raw(tmp_path, name, batch)
        raw["eval"]["batch_size"] = 3  # 8 held-out pairs: 3 batches, one rank runs a spare
        if name == "two":
            raw["train"]["distributed"] = {"strategy": strategy}
        path.write_text(yaml.safe_dump(raw))
        return path

    assert main(["-q", "train", str(config("one", 4))]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    cmd += ["-m", "kiln", "train", str(config("two", 2))]
    done = subprocess.run(
        cmd, cwd=ROOT, env=gloo_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]

    def records(name: str, split: str) -> list[dict[str, Any]]:
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").open()]
        return [r for r in rows if r["split"] == split]

    for split, keys in (("train", ("loss", *METRICS)), ("val", ("val_loss", "val_pairs"))):
        one, two = records("one", split), records("two", split)
        assert [r["step"] for r in two] == [r["step"] for r in one]
        for key in keys:
            assert [r[key] for r in two] == pytest.approx(
                [r[key] for r in one], rel=1e-5, abs=1e-6
            ), (split, key)
    a = load_file(tmp_path / "two" / "final" / "model.safetensors")
    b = load_file(tmp_path / "one" / "final" / "model.safetensors")
    for name in b:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name


def test_kiln_train_names_bad_pairs_in_one_line_each(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.helpers import ROOT

    rows: list[dict[str, Any]] = list(pairs(8))
    rows[1] = {"prompt": "p", "chosen": "c"}
    rows[4] = {"prompt": "p", "chosen": "c", "rejected": ""}
    raw = scratch_raw(tmp_path, "bad", 2)
    raw["data"]["train"] = str(write_jsonl(tmp_path / "bad.jsonl", rows))
    config = tmp_path / "bad.yaml"
    config.write_text(json.dumps(raw))
    done = subprocess.run(
        [sys.executable, "-m", "kiln", "train", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [x for x in done.stderr.splitlines() if "bad.jsonl:" in x]
    assert len(lines) == 2, done.stderr
    assert "bad.jsonl:2: missing field 'rejected'" in lines[0]
    assert "bad.jsonl:5: field 'rejected' is empty" in lines[1]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_kiln_eval_reports_preference_accuracy_as_the_run_validated(
    tmp_path: Path, tokenizer, lora: bool
) -> None:
    """`kiln eval RUN --data pairs.jsonl` rebuilds the run's reference (its seeded init, or
    the base with LoRA's adapters off) and reports the run's own last validation."""
    from kiln.cli import main

    if lora:
        pytest.importorskip("peft")
        model_dir, tok_dir = _model_dirs(tmp_path, tokenizer)
        train = write_jsonl(tmp_path / "p.jsonl", pairs(24))
        raw = dpo_raw(tmp_path, train, model_dir, tok_dir, steps=4, batch=4, lr=5e-3)
        raw["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
        raw["log"]["every_steps"] = 2
    else:
        raw = scratch_raw(tmp_path, "run", 4)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", pairs(60)[48:])
    raw["data"]["val"] = str(held_out)
    raw["eval"] = {"every_steps": 2}
    result = Trainer(load_config(data=raw)).fit()
    out = tmp_path / "report.json"
    assert (
        main(["-q", "eval", str(result.run_dir), "--data", str(held_out), "--out", str(out)]) == 0
    )
    report = json.loads(out.read_text())["metrics"]
    last = result.metrics[-1]
    for key in ("val_loss", "val_rewards/accuracies", "val_rewards/margins", "val_pairs"):
        assert report[key] == pytest.approx(last[key], rel=1e-5, abs=1e-6), key
    assert last["val_rewards/margins"] != 0  # trained: the rewards moved off the reference


def test_a_sweep_ranks_dpo_trials_by_their_validation_metrics(tmp_path: Path) -> None:
    from kiln.sweep.study import metric_problem

    cfg = load_config(data=scratch_raw(tmp_path, "sweep", 4))
    assert metric_problem("val_rewards/accuracies", cfg) is None
    assert metric_problem("val_loss", cfg) is None
    problem = metric_problem("val_reward/accuracies", cfg)
    assert "did you mean val_rewards/accuracies?" in problem
    assert "val_ppl" in metric_problem("val_ppl", cfg)  # pairs have no perplexity


@pytest.mark.slow
def test_a_dpo_model_exports_like_any_causal_lm(tmp_path: Path) -> None:
    """The result of DPO is a plain causal LM: `kiln export` checks it against PyTorch."""
    from kiln.cli import main

    result = Trainer(load_config(data=scratch_raw(tmp_path, "run", 4))).fit()
    assert main(["-q", "export", str(result.run_dir), "--format", "torchscript"]) == 0
    assert (result.run_dir / "export" / "kiln_export.json").is_file()
