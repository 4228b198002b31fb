"""The instruction task: templates, label masking, truncation, collate, and an end-to-end run."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import bpe_tokenizer, make_rows, tiny_config
from transformers import PreTrainedTokenizerFast

from kiln import Trainer
from kiln.config import RunConfig, load_config
from kiln.data import (
    IGNORE_INDEX,
    InstructionFormat,
    Row,
    TokenDataset,
    build_datasets,
    collate,
    load_splits,
    make_format,
    prepare_data,
    render_rows,
    tokenize_instruction,
)
from kiln.device import Precision
from kiln.engine.evaluate import evaluate
from kiln.engine.loss import count_targets
from kiln.errors import DataError

CORPUS = [
    "Question: How do I cook lemon rice?\nAnswer: Rinse the rice, then simmer it with lemon.",
    "Question: What goes in a lemon soup?\nAnswer: Lemon, rice, eggs and stock.",
    "Instruction: Name a herb.\nResponse: Basil, thyme or parsley.",
    "Boil the pasta in salted water until tender.",
]

PROMPTS = [
    "Question: How do I cook lemon rice?\nAnswer:",
    "Instruction: Name a herb.\nResponse: ",
    "Question: cook lem",  # the response completes a word: "lem" + "on" would merge jointly
    "",
]
RESPONSES = [" Rinse the rice, then simmer it with lemon.", "Basil", "on rice", "Boil the pasta."]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE trained in-process (no network)."""
    return bpe_tokenizer(CORPUS * 5)


def ids_of(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_cfg(tmp_path: Path, seed: int = 0, **data: Any) -> RunConfig:
    data.setdefault("train", str(tmp_path / "train.jsonl"))
    data.setdefault("val_split", 0.0)
    return load_config(
        data={
            "task": "instruction",
            "seed": seed,
            "model": {"arch": "gpt2"},
            "data": data,
            "train": {"max_steps": 10},
        }
    )


def spans(example: dict[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    """(masked ids, target ids) of an example, checking the mask is one prefix."""
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    k = sum(label == IGNORE_INDEX for label in labels)
    assert labels[:k] == [IGNORE_INDEX] * k
    assert labels[k:] == ids[k:]
    return ids[:k], ids[k:]


# --- tokenization and label masking ---------------------------------------------------------


def test_labels_mask_the_prompt_token_by_token(tokenizer: PreTrainedTokenizerFast) -> None:
    eos = tokenizer.eos_token_id
    ds = tokenize_instruction(PROMPTS, RESPONSES, tokenizer, max_length=64)
    assert len(ds) == len(PROMPTS)
    assert ds.has_labels
    assert ds.aligned
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        masked, target = spans(ds[i])
        # Prompt and response are tokenized separately, then joined with a final EOS.
        assert masked == ids_of(tokenizer, prompt)
        assert target == [*ids_of(tokenizer, response), eos]
        assert tokenizer.decode(masked) == prompt
        assert tokenizer.decode(target) == response + tokenizer.eos_token
    # Jointly, BPE would merge "lem" + "on" across the boundary; separately it cannot.
    assert ids_of(tokenizer, PROMPTS[2] + RESPONSES[2]) != spans(ds[2])[0] + spans(ds[2])[1][:-1]
    # Target tokens: labels != -100 after the causal shift. The empty prompt's first response
    # token sits at position 0, which nothing predicts.
    expected = sum(len(ids_of(tokenizer, r)) + 1 for r in RESPONSES) - 1
    assert ds.num_tokens == expected


def test_truncation_cuts_the_response_and_drops_samples_without_targets(
    tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    eos = tokenizer.eos_token_id
    prompt, response = ids_of(tokenizer, PROMPTS[0]), ids_of(tokenizer, RESPONSES[0])
    limit = len(prompt) + 3
    prompts = [PROMPTS[0], "Q: herb?", PROMPTS[0] + " Please answer at length, in detail."]
    responses = [RESPONSES[0], "Basil", "x"]
    ds = tokenize_instruction(prompts, responses, tokenizer, max_length=limit, truncation=True)
    assert len(ds) == 2  # the third prompt alone exceeds the limit: dropped, not cut
    assert "dropped 1 of 3 samples" in caplog.text
    assert "sample 2" in caplog.text
    masked, target = spans(ds[0])
    assert masked == prompt  # the whole prompt is kept
    assert target == response[:3]  # the response is cut from its end, and gets no EOS
    assert eos not in target
    assert len(ds[0]["input_ids"]) == limit
    # A sample that fits is untouched.
    assert spans(ds[1]) == (ids_of(tokenizer, "Q: herb?"), [*ids_of(tokenizer, "Basil"), eos])
    # A prompt of exactly max_length tokens leaves no target either.
    exact = tokenize_instruction(
        [PROMPTS[0], "Q: herb?"], ["a", "b"], tokenizer, max_length=len(prompt)
    )
    assert len(exact) == 1
    with pytest.raises(DataError, match=r"all 1 samples dropped.*data\.max_length=4"):
        tokenize_instruction([PROMPTS[0]], ["a"], tokenizer, max_length=4, what="training data")


def test_no_truncation_names_every_too_long_sample(tokenizer: PreTrainedTokenizerFast) -> None:
    n_prompt = len(ids_of(tokenizer, PROMPTS[0]))
    n_response = len(ids_of(tokenizer, RESPONSES[0]))
    limit = n_prompt + n_response  # one short of the EOS
    with pytest.raises(DataError) as exc:
        tokenize_instruction(
            [PROMPTS[0], "Q", PROMPTS[0]],
            [RESPONSES[0], "A", RESPONSES[0] + "!"],
            tokenizer,
            max_length=limit,
            truncation=False,
            locations=["a.jsonl:1", "a.jsonl:2", "a.jsonl:3"],
        )
    assert exc.value.problems[0] == (
        f"a.jsonl:1: {limit + 1} tokens (prompt {n_prompt} + response {n_response} + EOS) "
        f"exceed data.max_length={limit}; raise data.max_length or set data.truncation: true"
    )
    assert len(exc.value.problems) == 2
    assert exc.value.problems[1].startswith("a.jsonl:3: ")
    fits = tokenize_instruction(
        [PROMPTS[0]], [RESPONSES[0]], tokenizer, max_length=limit + 1, truncation=False
    )
    assert len(fits[0]["input_ids"]) == limit + 1


def test_build_datasets_file_line_errors_and_drop_counts(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    long_prompt = "Question: " + "lemon rice " * 20
    rows = [
        {"prompt": "Q: soup?", "response": "Lemon, rice."},
        {"prompt": long_prompt, "response": "Yes."},
        {"prompt": "Q: herb?", "response": "Basil."},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    strict = make_cfg(tmp_path, max_length=16, truncation=False)
    with pytest.raises(DataError, match=rf"^{path}:2: \d+ tokens \(prompt"):
        prepare_data(strict, tokenizer)
    cfg = make_cfg(tmp_path, max_length=16, prompt_template="{prompt}\n")
    train, val, stats = prepare_data(cfg, tokenizer)
    assert val is None
    assert len(train) == stats.train_examples == 2
    assert stats.train_rows == 3
    assert stats.dropped["no_target"] == 1
    assert stats.train_tokens == train.num_tokens
    assert tokenizer.decode(spans(train[1])[0]) == "Q: herb?\n"
    assert tokenizer.decode(spans(train[1])[1]) == "Basil." + tokenizer.eos_token


# --- templates ------------------------------------------------------------------------------

TEMPLATES = [
    {"prompt": "Q: {question}\nA:", "response": " {answer}"},
    {"prompt": "Instruction: {question}\nResponse:\n", "response": "{answer}"},
    {"prompt": "{question}\n\n", "response": "Answer: {answer}"},
]


def _qa_rows(n: int, source: str = "data/train.jsonl") -> list[Row]:
    return [Row({"question": f"q{i}", "answer": f"a{i}"}, source, i + 1) for i in range(n)]


def test_mixed_templates_are_deterministic_and_balanced(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, templates=TEMPLATES)
    fmt = make_format(cfg)
    assert isinstance(fmt, InstructionFormat)
    rows = _qa_rows(3000)
    torch_state, py_state = torch.random.get_rng_state(), random.getstate()
    picks = [fmt.template_index(r, i) for i, r in enumerate(rows)]
    assert torch.equal(torch_state, torch.random.get_rng_state())  # no global RNG touched
    assert py_state == random.getstate()
    # Every template, with about 1/3 of the rows each.
    counts = [picks.count(k) for k in range(3)]
    assert all(900 <= c <= 1100 for c in counts), counts
    # Renders follow the picks.
    rendered = render_rows(fmt, rows[:30])
    for row, pick, (prompt, response) in zip(rows[:30], picks[:30], rendered, strict=True):
        t = TEMPLATES[pick]
        assert prompt == t["prompt"].format(**row)
        assert response == t["response"].format(**row)
    # The same row gets the same template: in a new format object, whatever the global RNG,
    # after rows before it are dropped (a split, a filter), and from another directory.
    random.seed(123)
    torch.manual_seed(123)
    again = make_format(cfg)
    assert [again.template_index(r, 0) for r in rows[::-1]] == picks[::-1]
    moved = _qa_rows(3000, source="/elsewhere/train.jsonl")
    assert [again.template_index(r, i) for i, r in enumerate(moved)] == picks
    # Pinned: a resume with a later kiln version must pick the same templates.
    assert picks[:12] == PINNED_PICKS
    # Another seed, another assignment (still balanced).
    other = [make_format(cfg.model_copy(update={"seed": 1})).template_index(r, 0) for r in rows]
    assert other != picks
    assert all(900 <= other.count(k) <= 1100 for k in range(3))
    # Plain dicts (no location) are keyed by their index.
    plain = [dict(r) for r in rows[:50]]
    assert [fmt.template_index(r, i) for i, r in enumerate(plain)] == [
        fmt.template_index(r, i) for i, r in enumerate(plain)
    ]


PINNED_PICKS = [1, 2, 0, 1, 1, 2, 0, 0, 0, 0, 2, 1]  # seed 0, train.jsonl lines 1-12


def test_mixed_templates_through_load_splits(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(40)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg(tmp_path, templates=TEMPLATES, val_split=0.25)
    train, val, _ = load_splits(cfg)
    fmt = make_format(cfg)
    # Split rows render exactly as their file lines do: the pick does not move with the split.
    unsplit = load_splits(make_cfg(tmp_path, templates=TEMPLATES))[0]
    by_line = {
        row.line: rendered for row, rendered in zip(unsplit, render_rows(fmt, unsplit), strict=True)
    }
    for row, rendered in zip(train + val, render_rows(fmt, train + val), strict=True):
        assert rendered == by_line[row.line]
    assert {fmt.template_index(r, 0) for r in train} == {0, 1, 2}


def test_missing_template_field_names_key_and_line(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [{"prompt": "p", "response": "r"}, {"prompt": "p2"}, {"prompt": "p3", "response": None}],
    )
    with pytest.raises(DataError) as exc:
        load_splits(make_cfg(tmp_path))
    assert exc.value.problems == [
        f"data.response_template: field 'response' is not in the rows ({path}:2)",
        f"data.response_template: field 'response' is null ({path}:3)",
    ]
    # Mixed templates: a row must fill every template, whichever one it was given.
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [{"question": "q", "answer": "a"}] + [{"answer": f"a{i}"} for i in range(5)],
    )
    with pytest.raises(DataError) as exc:
        load_splits(make_cfg(tmp_path, templates=TEMPLATES))
    assert exc.value.problems == [
        f"data.templates[0].prompt: field 'question' is not in the rows ({path}:2)"
    ]
    with pytest.raises(DataError, match=r"data\.templates\[1\]\.response: use named fields"):
        make_format(make_cfg(tmp_path, templates=[TEMPLATES[0], {"prompt": "x", "response": "{}"}]))


# --- dataset and collate --------------------------------------------------------------------


def test_collate_pads_ids_and_labels(tokenizer: PreTrainedTokenizerFast) -> None:
    ds = tokenize_instruction(PROMPTS, RESPONSES, tokenizer, max_length=64)
    pad = tokenizer.pad_token_id
    batch = collate([ds[1], ds[0], ds[3]], pad_id=pad, task="instruction")
    lengths = [len(ds[i]["input_ids"]) for i in (1, 0, 3)]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    for row, i, n in zip(range(3), (1, 0, 3), lengths, strict=True):
        assert batch["input_ids"][row, :n].tolist() == ds[i]["input_ids"].tolist()
        assert batch["input_ids"][row, n:].tolist() == [pad] * (width - n)
        assert batch["labels"][row, :n].tolist() == ds[i]["labels"].tolist()
        assert batch["labels"][row, n:].tolist() == [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    # The trainer's count (after the shift) agrees with the dataset's.
    full = collate([ds[i] for i in range(len(ds))], pad_id=pad, task="instruction")
    assert count_targets(full, "instruction") == ds.num_tokens
    wide = collate([ds[1]], pad_id=pad, task="instruction", pad_to_multiple_of=32)
    assert wide["labels"].shape == (1, 32)
    with pytest.raises(ValueError, match="needs labels"):
        collate([{"input_ids": [1, 2]}], pad_id=pad, task="instruction")
    with pytest.raises(ValueError, match="length of their input_ids"):
        collate([{"input_ids": [1, 2], "labels": [2]}], pad_id=pad, task="instruction")


def test_token_dataset_aligned_labels() -> None:
    ds = TokenDataset([[5, 6, 7, 8], [9, 10], []], labels=[[-100, -100, 7, 8], [9, 10], []])
    assert not ds.aligned
    assert ds.num_tokens == 4  # seq2seq-style: every label != -100
    aligned = TokenDataset(
        [[5, 6, 7, 8], [9, 10], []], labels=[[-100, -100, 7, 8], [9, 10], []], aligned=True
    )
    assert aligned.aligned
    assert aligned.num_tokens == 3  # 7, 8 and 10: position 0 (the 9) is never predicted
    assert "aligned labels" in repr(aligned)
    assert aligned[0]["labels"].tolist() == [-100, -100, 7, 8]
    with pytest.raises(ValueError, match="lengths of their input_ids"):
        TokenDataset([[1, 2]], labels=[[2]], aligned=True)
    with pytest.raises(ValueError, match="labels must be token ids >= 0 or -100"):
        TokenDataset([[1, 2]], labels=[[-5, 2]])


# --- end to end -----------------------------------------------------------------------------


def _qa_files(tmp_path: Path) -> tuple[Path, Path]:
    def qa(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {"prompt": f"Ingredients for {r['title']}?", "response": "\n".join(r["ingredients"])}
            for r in rows
        ]

    train = write_jsonl(tmp_path / "train.jsonl", qa(make_rows(120, seed=1)))
    val = write_jsonl(tmp_path / "val.jsonl", qa(make_rows(12, seed=2)))
    return train, val


def test_trainer_learns_responses_and_val_loss_is_response_only(tmp_path: Path) -> None:
    train_file, val_file = _qa_files(tmp_path)
    cfg = tiny_config(
        tmp_path,
        train_file,
        val_file,
        task="instruction",
        data={"prompt_template": "{prompt}\n", "max_length": 64},
        train={"max_steps": 40, "batch_size": 8},
        eval={"every_steps": 20},
        log={"every_steps": 10},
    )
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert sum(result.loss_history[-5:]) < 0.8 * sum(result.loss_history[:5])
    assert result.metrics[-1]["val_loss"] < result.metrics[0]["val_loss"]

    model, tok, val = trainer.model.eval(), trainer.tokenizer, trainer.val_data
    assert isinstance(val, TokenDataset)
    assert len(val) == 12
    rows = [json.loads(line) for line in val_file.read_text().splitlines()]
    # Hand-computed: each example alone, cross-entropy on the response tokens and EOS only.
    loss_sum, n_targets = 0.0, 0
    with torch.no_grad():
        for example, row in zip(val, rows, strict=True):
            ids = example["input_ids"]
            n_prompt = len(ids_of(tok, row["prompt"] + "\n"))
            assert ids[n_prompt:].tolist() == [*ids_of(tok, row["response"]), tok.eos_token_id]
            logits = model(ids[None]).logits[0]  # (T, V)
            # Position t predicts token t + 1: the targets are positions n_prompt .. T - 1.
            token_losses = F.cross_entropy(
                logits[n_prompt - 1 : -1], ids[n_prompt:], reduction="none"
            )
            loss_sum += float(token_losses.double().sum())
            n_targets += len(token_losses)
            # Parity with transformers' own shifted loss (mean over the example's targets).
            hf = model(ids[None], labels=example["labels"][None]).loss
            torch.testing.assert_close(token_losses.mean(), hf)
    metrics = evaluate(
        model,
        val,
        task="instruction",
        batch_size=5,  # padded batches: padding must not count
        pad_id=trainer.pad_id,
        precision=Precision("fp32", torch.device("cpu")),
    )
    assert metrics is not None
    assert metrics["val_tokens"] == n_targets == val.num_tokens
    assert metrics["val_loss"] == pytest.approx(loss_sum / n_targets, rel=1e-5)
    assert result.metrics[-1]["val_loss"] == pytest.approx(loss_sum / n_targets, rel=1e-5)
    stats = json.loads((cfg.run_dir / "data_stats.json").read_text())
    assert stats["dropped"]["no_target"] == 0
    assert stats["val_tokens"] == n_targets


def test_build_datasets_accepts_plain_dict_rows(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    cfg = make_cfg(tmp_path, templates=TEMPLATES[:2], max_length=64)
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(6)]
    train, val, stats = build_datasets(cfg, tokenizer, rows[:4], rows[4:])
    assert val is not None
    assert (len(train), len(val)) == (4, 2)
    assert stats.dropped["no_target"] == 0
    assert stats.val_tokens == val.num_tokens > 0
