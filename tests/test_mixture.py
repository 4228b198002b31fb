"""Weighted mixtures of token shard sets (issue 28 item 4, `data.sources`): token shares within
1% of the weights, an order fixed by the seed, exact resume, tokens seen per source in the
metrics, per-source counts in data_stats.json, one line for a bad mixture config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from kiln.cli import main
from kiln.config import load_config
from kiln.data import BatchCursor
from kiln.data.assemble import Given, assemble_data
from kiln.data.collate import Batcher
from tests.helpers import assert_resume_is_exact, bpe_tokenizer, make_rows, tiny_raw, write_jsonl

SAMPLES = 10_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two sources of different sizes (web: 300 rows, books: 100 other rows), a tokenizer,
    and a shard cache the module's tests share (each set is prepared once)."""
    root = tmp_path_factory.mktemp("mixture")
    tok = root / "tok"
    bpe_tokenizer([r["text"] for r in make_rows(200)]).save_pretrained(tok)
    web = write_jsonl(root / "web.jsonl", make_rows(300))
    books = write_jsonl(root / "books.jsonl", make_rows(400, seed=1)[300:])
    return {"web": web, "books": books, "tok": tok, "cache": root / "cache"}


def _raw(tmp: Path, corpus: dict[str, Path], weights: tuple[float, float] = (0.7, 0.3), **data):
    sources = [
        {"path": str(corpus["web"]), "weight": weights[0]},
        {"path": str(corpus["books"]), "weight": weights[1]},
    ]
    return tiny_raw(
        tmp,
        corpus["web"],
        None,
        tokenizer={"name_or_path": str(corpus["tok"])},
        data={
            "train": None,
            "sources": sources,
            "storage": "shards",
            "shard_tokens": 3000,
            "val_split": 0.1,
            "cache_dir": str(corpus["cache"]),
            **data,
        },
        eval={"every_steps": 6},
        train={"max_steps": 12},
    )


def _data(tmp: Path, corpus: dict[str, Path], seed: int = 0, **data: Any) -> Any:
    raw = _raw(tmp, corpus, **data)
    raw["seed"] = seed
    return assemble_data(load_config(data=raw), Given())


def _shares(mixture: Any, seed: int, samples: int = SAMPLES, batch: int = 8) -> np.ndarray:
    """Each source's share of the input tokens of the first `samples` samples the run's
    cursor draws (all of them read through the mixture's index map)."""
    cursor = BatchCursor(len(mixture), batch, seed)
    drawn = torch.cat([cursor.next_indices() for _ in range(samples // batch)])
    source, _ = mixture.locate(drawn.numpy())
    tokens = np.bincount(source, weights=mixture.lengths[drawn].numpy(), minlength=2)
    return tokens / tokens.sum()


@pytest.mark.parametrize("packing", [True, False])
def test_item04_a_mixture_draws_the_weights_token_shares_within_one_percent(
    tmp_path: Path, corpus: dict[str, Path], packing: bool
) -> None:
    data = _data(tmp_path, corpus, packing=packing, max_length=64)
    mixture = data.train
    shares = _shares(mixture, seed=0)
    assert abs(shares[0] - 0.7) < 0.01, shares
    assert abs(shares[1] - 0.3) < 0.01, shares
    # a whole epoch holds the weights' shares up to one example's rounding
    epoch = [v["share"] for v in data.stats["sources"].values()]
    assert np.allclose(epoch, [0.7, 0.3], atol=1.0 / len(mixture) * 64), epoch
    # web (down-weighted) gives a seeded subset of its examples, books (up-weighted) repeats
    # each of its examples once or twice per epoch
    web, books = mixture.sources
    source, local = mixture.locate(np.arange(len(mixture)))
    web_used = local[source == 0]
    assert mixture.counts[0] < len(web)
    assert len(np.unique(web_used)) == web_used.size
    repeats = np.bincount(local[source == 1], minlength=len(books))
    assert mixture.counts[1] > len(books)
    assert set(repeats.tolist()) == {1, 2}


class _Blocks:
    """A stand-in source of `n` packed blocks of 1024 tokens (only what `weighted` reads)."""

    def __init__(self, n: int) -> None:
        self.n, self.lengths, self.blocks = n, torch.full((n,), 1024), None

    def __len__(self) -> int:
        return self.n


def test_item04_every_prefix_of_every_epoch_holds_the_shares(tmp_path: Path) -> None:
    from kiln.data.sampler import epoch_permutation
    from kiln.data.shards.mixture import Mixture

    n = 500_000  # a corpus of 1M blocks: 10k samples are 1% of an epoch
    sources, seed = [_Blocks(n), _Blocks(n)], 3
    mixture = Mixture.weighted(
        sources, ["a", "b"], [0.7, 0.3], seed, lambda e: epoch_permutation(2 * n, seed, e)
    )
    t = np.arange(1, SAMPLES + 1)
    for epoch in (0, 1, 2):  # each epoch's first samples, as the cursor draws them
        cursor = BatchCursor(len(mixture), 8, seed, epoch=epoch)
        drawn = torch.cat([cursor.next_indices() for _ in range(SAMPLES // 8)])
        source, _ = mixture.for_epoch(epoch).locate(drawn.numpy())
        taken = np.cumsum(source == 0)
        assert np.abs(taken - 0.7 * t).max() <= 1.0  # every prefix, to within one sample
    cursor = BatchCursor(len(mixture), 8, seed)
    drawn = torch.cat([cursor.next_indices() for _ in range(SAMPLES // 8)])
    # without the first epoch's order, a prefix is a random draw: near, not exact
    plain = Mixture.weighted(sources, ["a", "b"], [0.7, 0.3], seed)
    share = float((plain.locate(drawn.numpy())[0] == 0).mean())
    assert abs(share - 0.7) < 0.02
    assert np.array_equal(
        np.sort(plain.local[plain.source == 0]), np.sort(mixture.local[mixture.source == 0])
    )


def test_item04_a_down_weighted_source_gives_new_examples_each_epoch() -> None:
    from kiln.data.sampler import epoch_permutation
    from kiln.data.shards.mixture import Mixture

    sources, seed = [_Blocks(300), _Blocks(700)], 5  # a: 30% of the examples, weight 10%
    mixture = Mixture.weighted(
        sources, ["a", "b"], [0.1, 0.9], seed, lambda e: epoch_permutation(1000, seed, e)
    )
    m_a, m_b = (int(c) for c in mixture.counts)
    assert (m_a, m_b) == (100, 900)
    drawn: list[np.ndarray] = []
    for epoch in range(3):  # 3 epochs of 100 examples of a: each of its 300 exactly once
        view = mixture.for_epoch(epoch)
        assert (view.source == 0).sum() == m_a  # the same counts every epoch
        drawn.append(view.local[view.source == 0])
    assert np.array_equal(np.sort(np.concatenate(drawn)), np.arange(300))
    assert mixture.for_epoch(0) is mixture
    b = np.concatenate(
        [mixture.for_epoch(e).local[mixture.for_epoch(e).source == 1] for e in (0, 1)]
    )
    counts = np.bincount(b, minlength=700)  # up-weighted b: 1800 draws of 700, 2 or 3 each
    assert counts.min() >= 2
    assert counts.max() <= 3
    again = Mixture.weighted(
        sources, ["a", "b"], [0.1, 0.9], seed, lambda e: epoch_permutation(1000, seed, e)
    )
    assert np.array_equal(again.for_epoch(2).local, mixture.for_epoch(2).local)  # seeded


def test_item04_a_weight_too_small_to_draw_is_said(caplog: pytest.LogCaptureFixture) -> None:
    from kiln.data.shards.mixture import Mixture

    with caplog.at_level("WARNING", logger="kiln"):
        mixture = Mixture.weighted([_Blocks(100), _Blocks(100)], ["a", "b"], [1, 1e-6], 0)
    assert mixture.counts.tolist() == [200, 0]
    assert "data.sources.1 (b): its weight 1e-06 draws none of the 200 examples" in caplog.text


def test_item04_the_examples_are_the_sources_examples(
    tmp_path: Path, corpus: dict[str, Path]
) -> None:
    data = _data(tmp_path, corpus)
    mixture, val = data.train, data.val
    idx = torch.tensor([len(mixture) - 1, 0, 5, int(np.argmax(mixture.source == 1)), 5])
    batch = Batcher("causal_lm", 0)(mixture, idx)
    source, local = mixture.locate(idx.numpy())
    for row, (k, j) in enumerate(zip(source.tolist(), local.tolist(), strict=True)):
        own = Batcher("causal_lm", 0)(mixture.sources[k], torch.tensor([j]))
        length = own["input_ids"].shape[1]  # a block with no document start inside: 0 .. L-1
        own.setdefault("position_ids", torch.arange(length)[None])
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(batch[key][row], own[key][0]), (row, key)
        assert torch.equal(mixture[int(idx[row])]["input_ids"], own["input_ids"][0])
    # the mixture's doc_starts (made on demand) give the position ids it routes to sources
    everything = torch.arange(len(mixture))
    length = mixture.blocks.shape[1]
    flat = everything[:, None] * length + torch.arange(length)
    k = torch.searchsorted(mixture.doc_starts, flat, right=True) - 1
    start = torch.where(k >= 0, mixture.doc_starts[k.clamp(min=0)], 0).maximum(flat[:, :1])
    assert torch.equal(mixture.block_position_ids(everything), flat - start)
    # validation: every held-out example of each source once, and their counts add up
    assert len(val) == sum(len(s) for s in val.sources)
    assert val.num_tokens == sum(s.num_tokens for s in val.sources)
    source, local = val.locate(np.arange(len(val)))
    for k, held_out in enumerate(val.sources):  # each once, in its order, spread evenly
        assert np.array_equal(local[source == k], np.arange(len(held_out)))
        first = int(np.argmax(source == k))
        assert torch.equal(val.blocks[torch.tensor([first])], held_out.blocks[torch.tensor([0])])
    tenth = source[: len(val) // 10]  # what a small eval.max_batches reads
    assert abs((tenth == 1).mean() - len(val.sources[1]) / len(val)) < 0.05
    plain = mixture.without_documents()
    assert plain.doc_starts is None
    assert "position_ids" not in Batcher("causal_lm", 0)(plain, idx)


def test_item04_the_order_is_a_function_of_the_seed(
    tmp_path: Path, corpus: dict[str, Path]
) -> None:
    def drawn(seed: int) -> torch.Tensor:
        mixture = _data(tmp_path / str(seed), corpus, seed=seed).train  # assembled anew
        cursor = BatchCursor(len(mixture), 8, seed)
        return torch.cat([mixture.blocks[cursor.next_indices()] for _ in range(40)])

    first = drawn(0)
    assert torch.equal(first, drawn(0))
    assert not torch.equal(first, drawn(1))


@pytest.mark.slow
def test_item04_resume_is_exact_and_tokens_seen_per_source_are_logged(
    tmp_path: Path, corpus: dict[str, Path]
) -> None:
    def make(root: Path) -> Any:
        raw = _raw(root, corpus, max_samples=4, val_split=0.02)  # a short epoch, small val
        raw["checkpoint"] = {"every_steps": 5, "resume": "auto"}
        return load_config(data=raw)

    ref, _ = assert_resume_is_exact(make, tmp_path, stop_at=7)  # between two checkpoints
    run = tmp_path / "cut" / "run"

    def train_rows(run: Path) -> list[dict[str, Any]]:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r["split"] == "train"]

    keys = ("tokens_seen/web", "tokens_seen/books")
    rows = train_rows(run)
    assert [[r[k] for k in keys] for r in rows] == [
        [r[k] for k in keys] for r in train_rows(tmp_path / "ref" / "run")
    ]
    # the counts are those of the samples the run's cursor drew: 4 a step, 32 tokens each
    mixture = ref.setup().train_data
    assert len(mixture) < 7 * 4  # resumed in epoch 1: epoch 0 is counted too
    for r in rows:
        cursor = BatchCursor(len(mixture), 4, 0)
        counts = np.zeros(2, dtype=np.int64)
        for _ in range(r["step"]):  # each batch from its epoch's mixture
            drawn = cursor.next_indices()
            source, _ = mixture.for_epoch(cursor.last_epoch).locate(drawn.numpy())
            counts += np.bincount(source, minlength=2)
        assert [r[k] for k in keys] == (counts * 32).tolist()
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["split"] == "val"]
    assert evals
    assert all({"val_loss/web", "val_loss/books"} <= set(r) for r in evals)  # each source's
    card = (run / "final" / "README.md").read_text()  # the model card names the mixture
    assert f"`{corpus['web']}` (weight 0.7), `{corpus['books']}` (weight 0.3)" in card
    stats = json.loads((run / "data_stats.json").read_text())
    assert set(stats["sources"]) == {"web", "books"}
    web, books = stats["sources"]["web"], stats["sources"]["books"]
    assert (web["weight"], books["weight"]) == (0.7, 0.3)
    assert web["documents"] == 300
    assert books["documents"] == 100
    assert web["train_examples"] + books["train_examples"] == stats["train_examples"]
    assert web["train_tokens"] + books["train_tokens"] == stats["train_tokens"]
    assert abs(web["share"] - 0.7) <= 1 / stats["train_examples"]  # one example


def _config_file(tmp: Path, corpus: dict[str, Path], **data: Any) -> Path:
    raw = _raw(tmp, corpus, **data)
    raw["train"]["max_steps"] = 3
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"train": "x.jsonl"}, "data.sources: a mixture replaces data.train; set one of them"),
        ({"storage": "memory"}, "data.sources: a mixture needs data.storage: shards"),
        ({"sources": [{"path": "x.jsonl", "weight": 0}]}, "data.sources.0.weight: input should"),
        (
            {"sources": [{"path": "a/x.jsonl", "weight": 1}, {"path": "b/x.txt", "weight": 1}]},
            "data.sources: two sources are named 'x'",
        ),
    ],
)
def test_item04_a_bad_mixture_config_is_one_line(
    tmp_path: Path,
    corpus: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    data: dict[str, Any],
    expected: str,
) -> None:
    config = _config_file(tmp_path, corpus, **data)
    assert main(["-q", "train", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("kiln: error: ")
    assert expected in err


def test_item04_kiln_data_prepare_prepares_every_source_once(
    tmp_path: Path, corpus: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config_file(tmp_path, corpus, cache_dir=str(tmp_path / "cache"))
    assert main(["data", "prepare", str(config)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [x.split(":")[0] for x in lines] == ["web", "books"]
    assert all(": prepared " in x for x in lines), lines
    assert len(list((tmp_path / "cache").glob("shards-*"))) == 2
    assert main(["data", "prepare", str(config)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert all(x.endswith("(nothing to do)") for x in lines), lines
    assert main(["data", "preview", str(config), "--samples", "0"]) == 0  # each source's
    out = capsys.readouterr().out
    assert "== data.sources.0: web (weight 0.7) ==" in out
    assert "== data.sources.1: books (weight 0.3) ==" in out
    assert out.count("# data preview") == 2
    # a source's missing file is named by its key
    missing = [
        {"path": str(corpus["web"]), "weight": 1},
        {"path": str(tmp_path / "no.jsonl"), "weight": 1},
    ]
    config = _config_file(tmp_path, corpus, sources=missing)
    assert main(["data", "prepare", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"data.sources.1: {tmp_path / 'no.jsonl'}: " in err


def test_item05_validation_gives_each_sources_loss(tmp_path: Path, corpus: dict[str, Path]) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from kiln.device import Precision
    from kiln.engine.evaluate import evaluate

    data = _data(tmp_path, corpus, val_split=0.2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=16, n_layer=1, n_head=2)).eval()
    batcher = Batcher("causal_lm", 0)
    cpu = Precision("fp32", torch.device("cpu"))

    def run(dataset: Any, **kw: Any) -> dict[str, float]:
        got = evaluate(
            model,
            dataset,
            task="causal_lm",
            batch_size=3,
            pad_id=0,
            precision=cpu,
            batcher=batcher,
            **kw,
        )
        assert got
        return got

    both = run(data.val)
    alone = [run(source) for source in data.val.sources]  # each source's held-out part alone
    assert sorted(k for k in both if k.startswith("val_loss/")) == [
        "val_loss/books",
        "val_loss/web",
    ]
    for name, one in zip(("web", "books"), alone, strict=True):
        assert both[f"val_loss/{name}"] == pytest.approx(one["val_loss"], rel=1e-6)
    weighted = sum(a["val_loss"] * a["val_tokens"] for a in alone) / both["val_tokens"]
    assert both["val_loss"] == pytest.approx(weighted, rel=1e-6)
    assert both["val_tokens"] == sum(a["val_tokens"] for a in alone)
    assert not any(k.startswith("val_loss/") for k in alone[0])  # one source: no breakdown
    # max_batches: the sources of the first batches only (both, as the sources are spread).
    cut = run(data.val, max_batches=2)
    assert {"val_loss/web", "val_loss/books"} <= set(cut)
    assert cut["val_tokens"] < both["val_tokens"]


def test_item03_loader_workers_build_each_epochs_mixture(
    tmp_path: Path, corpus: dict[str, Path]
) -> None:
    from kiln import Trainer

    losses = []
    for workers in (0, 1):  # short epochs: the run crosses several, each its own mixture
        raw = _raw(tmp_path / f"w{workers}", corpus, max_samples=4, val_split=0.02)
        raw["data"]["loader_workers"] = workers
        losses.append(Trainer(load_config(data=raw)).fit().loss_history)
    assert losses[0] == losses[1]
    assert len(losses[0]) == 12
