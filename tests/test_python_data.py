"""Python data given to `Trainer(train_data=..., val_data=...)`: text rows go through the files'
pipeline (same tokens, same losses as the JSONL file), token ids train without a tokenizer,
data.val_split applies, and bad data is a one-line DataError naming the item."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_resume_is_exact, make_rows, tiny_config, tiny_raw, write_jsonl

from kiln import Trainer
from kiln.config import load_config
from kiln.data import TokenDataset
from kiln.errors import DataError

ROWS = make_rows(48, seed=3)
TRAIN = {"max_steps": 3, "batch_size": 4}
# A quality filter, so that the claim "the same pipeline as files" covers the drops too.
DATA = {"min_quality_score": 0.2, "val_split": 0.25}


class MapStyle(torch.utils.data.Dataset):
    """A map-style torch Dataset over a list (no `__iter__` of its own)."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __iter__(self) -> Any:
        return iter(self.items)


def _cfg(root: Path, train_file: Path, **sections: Any) -> Any:
    sections = {"train": TRAIN, "data": DATA, **sections}
    return tiny_config(root, train_file, None, **sections)


def _fit(cfg: Any, **kwargs: Any) -> tuple[Trainer, Any]:
    trainer = Trainer(cfg, **kwargs)
    return trainer, trainer.fit()


def _same_data(a: TokenDataset | None, b: TokenDataset | None) -> None:
    assert (a is None) == (b is None)
    if a is None or b is None:
        return
    assert len(a) == len(b)
    for i in range(len(a)):
        for key, value in a[i].items():
            assert torch.equal(value, b[i][key]), (i, key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trainer, Any]:
    """The rows as a JSONL file, trained through the config."""
    root = tmp_path_factory.mktemp("ref")
    train_file = write_jsonl(root / "train.jsonl", ROWS)
    trainer, result = _fit(_cfg(root, train_file))
    return train_file, trainer, result


def _hf_dataset(rows: list[dict[str, Any]]) -> Any:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("kind", ["dicts", "strings", "torch_dataset", "hf_dataset", "iterable"])
def test_text_rows_train_exactly_as_the_jsonl_file(
    tmp_path: Path, reference: tuple[Path, Trainer, Any], kind: str
) -> None:
    train_file, ref_trainer, ref = reference
    data: Any = {
        "dicts": lambda: list(ROWS),
        "strings": lambda: [r["text"] for r in ROWS],
        "torch_dataset": lambda: MapStyle(ROWS),
        "hf_dataset": lambda: _hf_dataset(ROWS),
        "iterable": lambda: Stream(ROWS),
    }[kind]()
    if kind == "strings":  # no quality field on a string: no quality filter on either side
        trainer, result = _fit(
            _cfg(tmp_path, train_file, data={"val_split": 0.25}), train_data=data
        )
        ref_trainer, ref = _fit(_cfg(tmp_path / "ref", train_file, data={"val_split": 0.25}))
    else:
        trainer, result = _fit(_cfg(tmp_path, train_file), train_data=data)
    _same_data(trainer.train_data, ref_trainer.train_data)
    _same_data(trainer.val_data, ref_trainer.val_data)  # data.val_split held out the same rows
    assert result.loss_history == ref.loss_history
    assert result.metrics == ref.metrics
    parts, ref_parts = trainer.setup(), ref_trainer.setup()
    assert parts.data_stats == ref_parts.data_stats  # the same drops, by reason
    assert (
        [r.where for r in parts.val_rows[:2]]
        == [  # type: ignore[index]
            f"train_data#{r.line - 1}"
            for r in ref_parts.val_rows[:2]  # type: ignore[index]
        ]
    )


def test_instruction_rows_render_as_the_files_do(tmp_path: Path) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", ROWS)
    data = {**DATA, "prompt_template": "Make {title}:\n", "response_template": "{steps}"}
    cfg = lambda root: _cfg(root, train_file, task="instruction", data=data)  # noqa: E731
    trainer, result = _fit(cfg(tmp_path / "py"), train_data=MapStyle(ROWS))
    ref_trainer, ref = _fit(cfg(tmp_path / "file"))
    _same_data(trainer.train_data, ref_trainer.train_data)
    assert result.loss_history == ref.loss_history


def test_python_rows_resume_exactly(tmp_path: Path) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", ROWS)
    train = {"max_steps": 4, "batch_size": 4}
    make = lambda root: _cfg(root, train_file, train=train, eval={"every_steps": 2})  # noqa: E731
    assert_resume_is_exact(make, tmp_path, 2, train_data=ROWS)


def test_val_split_applies_and_val_data_replaces_it(tmp_path: Path) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = _cfg(tmp_path, train_file, data={"val_split": 0.25, "dedup": False})
    parts = Trainer(cfg, train_data=ROWS).setup()
    assert (len(parts.train_rows), len(parts.val_rows)) == (36, 12)  # type: ignore[arg-type]
    parts = Trainer(cfg, train_data=ROWS, val_data=ROWS[:5]).setup()
    assert (len(parts.train_rows), len(parts.val_rows)) == (48, 5)  # type: ignore[arg-type]
    assert parts.val_rows[4].where == "val_data#4"  # type: ignore[index]
    ids = torch.randint(0, 200, (40, 16), generator=torch.Generator().manual_seed(0))
    parts = Trainer(cfg, train_data=ids).setup()
    assert (len(parts.train_data), len(parts.val_data)) == (30, 10)  # type: ignore[arg-type]
    # val_data with the config's files: it replaces data.val (no split)
    parts = Trainer(cfg, val_data=[r["text"] for r in ROWS[:3]]).setup()
    assert (len(parts.train_rows), len(parts.val_rows)) == (48, 3)  # type: ignore[arg-type]


def test_dataset_dict_gives_train_and_validation(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS[:40]), test=datasets.Dataset.from_list(ROWS[40:])
    )
    train_file = write_jsonl(tmp_path / "train.jsonl", ROWS[:40])
    val_file = write_jsonl(tmp_path / "val.jsonl", ROWS[40:])
    cfg = tiny_config(tmp_path / "py", train_file, None, train=TRAIN)
    trainer, result = _fit(cfg, train_data=dd)
    ref_cfg = tiny_config(tmp_path / "file", train_file, val_file, train=TRAIN)
    ref_trainer, ref = _fit(ref_cfg)
    _same_data(trainer.val_data, ref_trainer.val_data)
    assert result.loss_history == ref.loss_history
    assert result.metrics == ref.metrics
    with pytest.raises(DataError, match=r"^train_data: a DatasetDict without a train split"):
        Trainer(cfg, train_data=datasets.DatasetDict(test=dd["test"])).setup()


def test_token_examples_of_every_form_train_alike(tmp_path: Path) -> None:
    """Lists of ids, dicts of tensors in a torch Dataset, and a tensor: the same run."""
    train_file = write_jsonl(tmp_path / "train.jsonl", ROWS)
    ids = torch.randint(0, 250, (24, 16), generator=torch.Generator().manual_seed(1))
    forms = {
        "tensor": ids,
        "lists": ids.tolist(),
        "dicts": MapStyle([{"input_ids": row} for row in ids]),
        "hf": _hf_dataset([{"input_ids": row} for row in ids.tolist()]),
    }
    losses = {}
    for name, data in forms.items():
        trainer, result = _fit(_cfg(tmp_path / name, train_file), train_data=data)
        assert len(trainer.tokenizer) == 302  # tokenizer.vocab_size (300) ids + pad + eos
        losses[name] = result.loss_history
    torch.testing.assert_close(losses["lists"], losses["tensor"])
    assert losses["dicts"] == losses["lists"] == losses["hf"]


def test_tokens_without_a_tokenizer_or_vocab_size(tmp_path: Path) -> None:
    """The vocabulary is the largest id + 1; final/ holds a tokenizer that loads back."""
    from transformers import AutoTokenizer

    train_file = write_jsonl(tmp_path / "train.jsonl", ROWS)
    raw = tiny_raw(tmp_path, train_file, None, train=TRAIN, data=DATA)
    del raw["tokenizer"]
    ids = torch.randint(0, 90, (24, 16), generator=torch.Generator().manual_seed(2))
    ids[3, 5] = 99
    trainer, result = _fit(load_config(data=raw), train_data=ids)
    assert len(trainer.tokenizer) == 102  # ids 0..99, pad, eos
    assert result.status == "finished"
    assert trainer.model.get_input_embeddings().weight.shape[0] >= 102
    loaded = AutoTokenizer.from_pretrained(result.run_dir / "final")
    assert loaded.decode([5, 7, 99]) == " 5 7 99"
    assert loaded("5  7\n99")["input_ids"] == [5, 7, 99]
    assert loaded("x 5")["input_ids"] == [101, 5]  # not an id: eos


def test_tokens_beyond_the_vocabulary_are_refused(tmp_path: Path) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", ROWS)
    ids = torch.randint(0, 250, (24, 16), generator=torch.Generator().manual_seed(2))
    ids[0, 0] = 300
    with pytest.raises(DataError, match=r"^train_data: token id 300 is >= tokenizer.vocab_size"):
        Trainer(_cfg(tmp_path, train_file), train_data=ids).setup()


def test_tokens_with_the_jsonl_runs_tokenizer_reproduce_it(tmp_path: Path) -> None:
    """The file run's token blocks, given back as a tensor with its tokenizer: the same run."""
    train_file = write_jsonl(tmp_path / "train.jsonl", ROWS)
    data = {**DATA, "isolate_documents": False}
    ref_trainer, ref = _fit(_cfg(tmp_path / "ref", train_file, data=data))
    blocks = ref_trainer.train_data.blocks
    val = ref_trainer.val_data.blocks
    _, result = _fit(
        _cfg(tmp_path / "py", train_file, data=data),
        tokenizer=ref_trainer.tokenizer,
        train_data=blocks,
        val_data=val,
    )
    assert result.loss_history == ref.loss_history
    assert result.metrics == ref.metrics


BAD = [
    ([{"text": "a b c"}, {"title": "x"}], r"^train_data#1: missing field 'text'"),
    (
        [{"text": "a"}, [1, 2]],
        r"^train_data#1: expected a dict or a string \(a text row\), got list$",
    ),
    ([[1, 2], [3, -1]], r"^train_data#1 must hold token ids \(integers >= 0\), got -1$"),
    ([[1, 2], [0.5, 1.5]], r"^train_data#1 must hold token ids \(integers >= 0\), got floats$"),
    ([{"input_ids": [1]}, {"ids": [2]}], r"^train_data#1: missing field 'input_ids'$"),
    ([{"input_ids": [1]}, {"input_ids": "ab"}], r"^train_data#1: 'input_ids' must be a sequence"),
    ([{"input_ids": [1, 2]}, [3]], r"^train_data#1: expected a dict with 'input_ids'"),
    ([{"input_ids": [[1, 2]]}], r"^train_data#0: 'input_ids' must be 1-D token ids, got shape"),
    ([{"input_ids": [1], "labels": [1]}, {"input_ids": [2]}], r"^train_data#1: missing field 'la"),
    ([3, 4], r"^train_data#0: expected a dict, a string or a sequence of token ids, got int$"),
    ([], r"^train_data: no items \(the data is empty\)$"),
    ({"text": "a"}, r"^train_data: expected a list of dicts, .* got dict$"),
    (torch.rand(4, 8), r"^train_data: a tensor must be \(N, L\) integer token ids"),
    (torch.arange(8), r"^train_data: a tensor must be \(N, L\) integer token ids"),
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_bad_data_is_one_line_naming_the_item(tmp_path: Path, data: Any, message: str) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DataError, match=message) as exc:
        Trainer(_cfg(tmp_path, train_file), train_data=data).setup()
    assert "\n" not in str(exc.value)


def test_mixed_text_and_tokens_and_long_streams_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = _cfg(tmp_path, train_file)
    with pytest.raises(DataError, match=r"^val_data: token ids, but the training data \(data"):
        Trainer(cfg, val_data=[[1, 2, 3]]).setup()
    with pytest.raises(DataError, match=r"^val_data: text rows, but the training data \(train_"):
        Trainer(cfg, train_data=[[1, 2, 3]] * 8, val_data=["some text"]).setup()
    import kiln.data.python as python_data

    monkeypatch.setattr(python_data, "MAX_ITERABLE_ITEMS", 10)
    with pytest.raises(DataError, match=r"^train_data: an iterable of more than 10 items; write"):
        Trainer(cfg, train_data=Stream(ROWS)).setup()
    # on_bad_row=skip skips bad items like bad lines, counted
    cfg = _cfg(tmp_path / "skip", train_file, data={**DATA, "on_bad_row": "skip"})
    parts = Trainer(cfg, train_data=[*ROWS, 7, {"title": "no text"}]).setup()
    assert parts.data_stats["bad_rows"] == 2
    assert (
        parts.data_stats["bad_row_examples"][0] == "train_data#48: expected a dict or a "
        "string (a text row), got int"
    )
