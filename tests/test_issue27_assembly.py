"""Issue 27 items 2 and 3: data assembly lives in kiln/data (the engine asks it for a ready
dataset), names that collided are distinct, and one `Parallelism` object answers what the
ranks do with the model (no `is_sharded(model)` checks in the engine)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from kiln.engine.parallel import Parallelism
from kiln.rank import RankContext
from tests.helpers import make_rows, tiny_config, write_jsonl

KILN = Path(__file__).resolve().parent.parent / "kiln"


def _calls(name: str) -> list[str]:
    """`file:function` of every call of a function called `name` under kiln/."""
    found = []
    for path in sorted(KILN.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call):
                    f = node.func
                    called = f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)
                    if called == name:
                        found.append(f"{path.relative_to(KILN)}:{fn.name}")
    return sorted(set(found))


def _defined(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


# ---- item 2: data assembly out of the engine ---------------------------------------------------

MOVED = {
    "as_dataset",
    "python_sources",
    "token_splits",
    "token_tokenizer",
    "check_token_range",
    "tokenizer_corpus",
    "data_schedule",
    "Given",
    "assemble_data",
}


def test_item02_engine_defines_no_data_assembly() -> None:
    assert not (KILN / "engine" / "datasetup.py").exists()
    in_engine = {
        f"{p.name}:{name}"
        for p in (KILN / "engine").glob("*.py")
        for name in _defined(p) & (MOVED | {"_build_data", "build_schedule", "id_tokenizer"})
    }
    assert not in_engine
    assert _defined(KILN / "data" / "assemble.py") >= MOVED


def test_item02_build_parts_asks_data_once() -> None:
    """build_parts reads top to bottom: one call into data for the ready data."""
    tree = ast.parse((KILN / "engine" / "parts.py").read_text())
    [build] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_parts"]
    calls = [
        n.func.id
        for n in ast.walk(build)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    ]
    assert calls.count("assemble_data") == 1
    data_imports = {
        (n.module, a.name)
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("kiln.data")
        for a in n.names
    }
    assert data_imports - {("kiln.data", "TokenDataset")} <= {
        ("kiln.data.assemble", "Given"),
        ("kiln.data.assemble", "assemble_data"),
        ("kiln.data.collate", "Batcher"),
        ("kiln.data.augment", "AugmentedDataset"),  # type hints of Parts
        ("kiln.data.curriculum", "Curriculum"),
        ("kiln.data.sources", "where"),
    }, data_imports


def test_item02_one_hand_built_fast_tokenizer() -> None:
    assert _calls("PreTrainedTokenizerFast") == ["models/tokenizer.py:_fast_tokenizer"]
    from kiln.models.tokenizer import EOS_TOKEN, PAD_TOKEN, id_tokenizer

    tok = id_tokenizer(10)
    assert tok("5 7")["input_ids"] == [5, 7]
    assert tok.decode([5, 7]) == " 5 7"
    assert (tok.pad_token, tok.eos_token, len(tok)) == (PAD_TOKEN, EOS_TOKEN, 12)
    assert tok("x")["input_ids"] == [11]  # anything else is eos


def test_item02_colliding_names_are_distinct() -> None:
    import kiln
    import kiln.engine.anomaly as anomaly
    import kiln.metrics as metrics

    # The data schedule (curriculum, augmentation) and the LR schedule (optim.schedule_for).
    assert _calls("build_schedule") == []
    assert _calls("data_schedule") == ["data/assemble.py:assemble_data"]
    # The loop's clipping norm and the public measure of a model's gradients.
    assert not hasattr(anomaly, "grad_norm")
    assert kiln.grad_norm.__module__ == "kiln.helpers"
    # The throughput meter and the experiment trackers (callbacks/loggers).
    assert not hasattr(metrics, "MetricsTracker")
    assert metrics.ThroughputMeter.__module__ == "kiln.metrics.throughput"


def test_item02_clip_grad_norm_clips_and_returns_the_norm_before() -> None:
    from kiln.engine.anomaly import clip_grad_norm

    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    norm = clip_grad_norm([p], 1.0)
    assert norm.item() == pytest.approx(5.0)
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


# ---- item 3: one parallelism object ------------------------------------------------------------


def test_item03_is_sharded_asked_only_of_models_from_outside() -> None:
    """The engine asks `Parts.parallel`; `is_sharded(model)` stays where a model comes with no
    run around it: models/sharding.py itself and `load_weights` (`kiln.load_checkpoint`)."""
    assert _calls("is_sharded") == [
        "engine/resume.py:load_weights",
        "models/sharding.py:gather_final",
    ]


@pytest.mark.parametrize("strategy", ["auto", "ddp", "fsdp"])
def test_item03_one_process_is_no_parallelism(strategy: str) -> None:
    par = Parallelism.build(RankContext(), strategy, torch.device("cpu"))
    assert (par.strategy, par.world_size, par.mesh) == ("none", 1, None)
    assert not par.data_parallel
    assert not par.sharded
    assert par.synced is None
    assert par.main_writes_weights
    model = torch.nn.Linear(2, 2)
    assert par.wrap(model, torch.device("cpu")) is model


@pytest.mark.parametrize("strategy", ["auto", "ddp"])
def test_item03_ddp_on_n_ranks(strategy: str) -> None:
    ranks = RankContext(1, 4, 1)
    par = Parallelism.build(ranks, strategy, torch.device("cpu"))  # no mesh: no process group
    assert (par.strategy, par.world_size, par.mesh) == ("ddp", 4, None)
    assert par.data_parallel
    assert not par.sharded
    assert par.synced is None
    assert par.main_writes_weights


def test_item03_fsdp_answers() -> None:
    par = Parallelism(RankContext(0, 2, 0), "fsdp", mesh="mesh")
    assert par.data_parallel
    assert par.sharded
    assert not par.main_writes_weights
    assert par.synced == RankContext(0, 2, 0)  # every rank runs the model's calls


def test_item03_parts_carry_the_parallelism(tmp_path: Path) -> None:
    from kiln import Trainer

    train = write_jsonl(tmp_path / "train.jsonl", make_rows(16))
    cfg = tiny_config(tmp_path, train, None, train={"max_steps": 4, "batch_size": 4})
    parts = Trainer(cfg).setup()
    assert parts.parallel == Parallelism(RankContext(), "none")
    assert parts.train_model is parts.model
