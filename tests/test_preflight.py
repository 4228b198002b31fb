"""Check before you load (`kiln.preflight`): what a config names is refused before torch loads.

Each mistake goes through the real command line in a fresh interpreter (as
tests/test_cli_fast.py does), which reports its exit code and whether torch, transformers or
the heavy parts of kiln were imported; a missing extra is simulated by a meta path finder
that refuses the package, as an uninstalled one is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.config import load_config
from kiln.preflight import ONNX_MODULES, preflight_problems

RUNNER = """
import json, sys
blocked = set(sys.argv[1].split(",")) - {""}
class Uninstalled:  # as if these packages were not installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Uninstalled())
from kiln.cli import main
rc = main(sys.argv[2:])
heavy = ("torch", "transformers", "numpy", "kiln.data", "kiln.models", "kiln.job", "kiln.callbacks")
loaded = sorted({m for m in sys.modules for h in heavy if m == h or m.startswith(h + ".")})
print(json.dumps({"rc": rc, "loaded": loaded}))
"""

TINY = {
    "name": "tiny",
    "output_dir": "run",
    "model": {
        "arch": "gpt2",
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "max_position_embeddings": 64,
    },
    "tokenizer": {"vocab_size": 300},
    "data": {"train": "corpus/train.jsonl", "max_length": 32},
    "train": {"max_steps": 2, "batch_size": 2},
}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder holding tiny.yaml and its data (corpus/train.jsonl, corpus/val.jsonl)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("train", "val"):
        (corpus / f"{name}.jsonl").write_text('{"text": "a recipe"}\n')
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return tmp_path.resolve()  # as the run directory and --resume are named: resolved


def _kiln(work: Path, *args: str, block: tuple[str, ...] = ()) -> tuple[int, list[str], str]:
    """(exit code, stderr lines, stdout) of `kiln ARGS` run in `work`; asserts that nothing
    heavy was imported."""
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, ",".join(block), *args],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
    )
    *out, last = done.stdout.splitlines() or [""]
    report = json.loads(last)
    assert report["loaded"] == [], f"imported before the answer: {report['loaded'][:10]}"
    return report["rc"], done.stderr.splitlines(), "\n".join(out)


def _refused(work: Path, *args: str, block: tuple[str, ...] = ()) -> list[str]:
    """The problems `kiln train` and `kiln config validate` both give for `args` (the same
    lines: exit 2, each `kiln: error: <problem>`, nothing else), without the prefix."""
    answers = []
    for command in (["train"], ["config", "validate"]):
        code, err, _ = _kiln(work, "-q", *command, "tiny.yaml", *args, block=block)
        assert code == 2, err
        assert all(line.startswith("kiln: error: ") for line in err), err
        answers.append([line.removeprefix("kiln: error: ") for line in err])
    assert answers[0] == answers[1]
    return answers[0]


# ---- data ----------------------------------------------------------------------------------------


def test_a_missing_data_file(work: Path) -> None:
    assert _refused(work, "data.train=corpus/x.jsonl") == [
        "data.train: corpus/x.jsonl: no such file"
    ]


def test_a_glob_that_matches_nothing(work: Path) -> None:
    assert _refused(work, "data.train=corpus/*.csv") == [
        "data.train: corpus/*.csv: no files match this pattern"
    ]


def test_every_spec_of_a_list_and_the_validation_data(work: Path) -> None:
    lines = _refused(
        work,
        "data.train=[corpus/train.jsonl, corpus/gone.jsonl, 'corpus/*.jsonl']",
        "data.val=corpus/val.json",
    )
    assert lines == [
        "data.train: corpus/gone.jsonl: no such file",
        "data.val: corpus/val.json: no such file",
    ]


def test_a_mixture_source(work: Path) -> None:
    mixture = "[{path: corpus/train.jsonl, weight: 1}, {path: [corpus/w*.jsonl], weight: 2}]"
    shards = ("data.storage=shards", "tokenizer.name_or_path=gpt2")  # a hub id: not checked
    lines = _refused(work, "data.train=null", f"data.sources={mixture}", *shards)
    assert lines == ["data.sources.1.path: corpus/w*.jsonl: no files match this pattern"]


def test_hub_datasets_and_hub_models_are_not_checked(work: Path) -> None:
    code, err, out = _kiln(
        work,
        "config",
        "validate",
        "tiny.yaml",
        "data.train=hf:someone/recipes",
        "model.name_or_path=someone/model",
        "tokenizer.name_or_path=gpt2",
    )
    assert (code, err, out) == (0, [], "tiny.yaml: ok")


# ---- model and tokenizer -------------------------------------------------------------------------


def test_a_missing_model_directory(work: Path) -> None:
    assert _refused(work, "model.name_or_path=./base") == [
        "model.name_or_path: cannot load './base': no such directory"
    ]


def test_a_model_directory_without_config_json(work: Path) -> None:
    (work / "base").mkdir()
    (work / "base" / "tokenizer.json").write_text("{}")
    assert _refused(work, "model.name_or_path=base") == [
        "model.name_or_path: cannot load 'base': no config.json in the directory "
        "(not a transformers model)"
    ]
    (work / "base" / "config.json").write_text("{}")  # what is in it is the run's to judge
    code, err, _ = _kiln(work, "config", "validate", "tiny.yaml", "model.name_or_path=base")
    assert (code, err) == (0, [])


def test_a_missing_tokenizer_directory(work: Path) -> None:
    assert _refused(work, f"tokenizer.name_or_path={work / 'tok'}") == [
        f"tokenizer.name_or_path: cannot load tokenizer '{work / 'tok'}': no such directory"
    ]


# ---- the run directory and what is resumed -------------------------------------------------------


def _earlier_run(run: Path, *, checkpoint: bool = False) -> None:
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(TINY))
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
    if checkpoint:  # a complete checkpoint: a manifest whose files have their sizes
        step = run / "checkpoints" / "step-1"
        step.mkdir()
        (step / "model.safetensors").write_bytes(b"12345")
        files = {"model.safetensors": {"size": 5, "checksum": "00000000"}}
        (step / "manifest.json").write_text(json.dumps({"format": 1, "step": 1, "files": files}))


def test_an_output_dir_that_holds_a_run(work: Path) -> None:
    _earlier_run(work / "run")
    held = (
        f"output_dir: {work / 'run'} already holds a run (config.yaml, metrics.jsonl, "
        "checkpoints); pass --overwrite (overwrite=True) or choose another name/output_dir"
    )
    code, err, _ = _kiln(work, "-q", "train", "tiny.yaml")
    assert (code, err) == (2, [f"kiln: error: {held}"])
    # validate cannot know the flags train will get: a warning; with them, train's answer.
    code, err, out = _kiln(work, "config", "validate", "tiny.yaml")
    assert (code, err, out) == (0, [f"kiln: warning: {held}"], "tiny.yaml: ok")
    assert _kiln(work, "config", "validate", "tiny.yaml", "--overwrite")[:2] == (0, [])


def test_an_output_dir_that_is_a_file(work: Path) -> None:
    (work / "run").write_text("not a folder")
    lines = [f"output_dir: {work / 'run'} is a file, not a directory"]
    assert _refused(work) == lines
    assert _refused(work, "--overwrite") == lines


def test_a_missing_resume_target(work: Path) -> None:
    gone = work / "nothing-here"
    assert _refused(work, "--resume", "nothing-here") == [
        f"--resume: {gone}: not a complete kiln checkpoint (no valid manifest.json)"
    ]


def test_resume_without_a_complete_checkpoint(work: Path) -> None:
    _earlier_run(work / "run")
    assert _refused(work, "--resume") == [
        f"--resume: no complete checkpoint in {work / 'run' / 'checkpoints'}"
    ]
    code, err, _ = _kiln(work, "-q", "train", "--resume", "run")  # the run's own config
    assert (code, err) == (
        2,
        [f"kiln: error: --resume: no complete checkpoint in {work / 'run' / 'checkpoints'}"],
    )


def test_a_complete_checkpoint_passes_and_a_foreign_one_needs_overwrite(work: Path) -> None:
    _earlier_run(work / "other", checkpoint=True)
    _earlier_run(work / "run")
    step = work / "other" / "checkpoints" / "step-1"
    assert _kiln(work, "config", "validate", "tiny.yaml", "--resume", "run")[0] == 2
    assert _kiln(work, "config", "validate", "tiny.yaml", "--resume", "other")[:2] == (
        2,
        [
            f"kiln: error: output_dir: {work / 'run'} already holds a run (config.yaml, "
            f"metrics.jsonl, checkpoints), and --resume {step} is a checkpoint of another run "
            "(resume that run itself, or start this one afresh from it); pass --overwrite "
            "(overwrite=True) or choose another name/output_dir"
        ],
    )
    assert _kiln(work, "config", "validate", "tiny.yaml", "--resume", str(step), "--overwrite")[
        :2
    ] == (0, [])


# ---- extras --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "blocked", "line"),
    [
        (
            "lora.enabled=true",
            "peft",
            "lora.enabled: LoRA needs peft (No module named 'peft'); "
            "install it with: pip install 'kiln[lora]'",
        ),
        (
            "log.loggers=[tensorboard, wandb]",
            "wandb",
            "log.loggers: wandb needs wandb (No module named 'wandb'); "
            "install it with: pip install 'kiln[wandb]'",
        ),
        (
            "eval.generate.num_samples=2",
            "sacrebleu",
            "eval.generate.metrics: bleu needs sacrebleu (No module named 'sacrebleu'); "
            "install it with: pip install 'kiln[metrics]'",
        ),
        (
            "eval.generate.num_samples=2",
            "rouge_score",
            "eval.generate.metrics: rouge needs rouge_score (No module named 'rouge_score'); "
            "install it with: pip install 'kiln[metrics]'",
        ),
        (
            "export.on_finish=true",
            "onnxruntime",
            "export.on_finish: ONNX export needs onnxruntime (No module named 'onnxruntime'); "
            "install it with: pip install 'kiln[export]'",
        ),
    ],
)
def test_a_missing_extra(work: Path, override: str, blocked: str, line: str) -> None:
    assert _refused(work, override, block=(blocked,)) == [line]


def test_an_extra_not_needed_is_not_asked_for(work: Path) -> None:
    # TorchScript export needs no onnx; a tracker not listed needs nothing.
    args = ("export.on_finish=true", "export.formats=[torchscript]", "log.loggers=[tensorboard]")
    code, err, _ = _kiln(work, "config", "validate", "tiny.yaml", *args, block=("onnx", "wandb"))
    assert (code, err) == (0, [])


# ---- all at once ---------------------------------------------------------------------------------


def test_two_problems_give_two_lines(work: Path) -> None:
    assert _refused(work, "data.train=corpus/x.jsonl", "model.name_or_path=./base") == [
        "data.train: corpus/x.jsonl: no such file",
        "model.name_or_path: cannot load './base': no such directory",
    ]


def test_every_kind_at_once(work: Path) -> None:
    _earlier_run(work / "run")
    lines = _refused(
        work,
        "data.val=corpus/*.txt",
        "model.name_or_path=./base",
        "lora.enabled=true",
        "--resume",
        "gone",
        block=("peft",),
    )
    assert [line.partition(":")[0] for line in lines] == [
        "data.val",
        "model.name_or_path",
        "lora.enabled",
        "--resume",
    ]


def test_a_bad_value_is_answered_before_what_it_names(work: Path) -> None:
    # The config's own values first: what it names is only checked in a valid config.
    assert _refused(work, "optim.lr=-1", "data.train=corpus/x.jsonl") == [
        "tiny.yaml: optim.lr: input should be greater than 0 (got -1)"
    ]


# ---- the rules are the run's ---------------------------------------------------------------------


def test_other_ranks_leave_the_run_directory_to_the_main_one(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(work)  # where the config's data paths are
    _earlier_run(work / "run")
    cfg = load_config(work / "tiny.yaml", [f"output_dir={work / 'run'}"])
    assert len(preflight_problems(cfg)) == 1
    assert preflight_problems(cfg, run_dir=False) == []


def test_the_lines_are_the_ones_the_run_gives(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The late refusals, where the run meets the same problem, name it the same way."""
    from kiln.callbacks.loggers.base import check_installed
    from kiln.engine.rundir import RunDir
    from kiln.errors import KilnError
    from kiln.export.graph import opset_range
    from kiln.models.lora import import_peft

    monkeypatch.chdir(work)
    _earlier_run(work / "run")
    cfg = load_config(
        work / "tiny.yaml",
        [f"output_dir={work / 'run'}", "lora.enabled=true", "log.loggers=[mlflow]"],
    )
    for name in ("peft", "mlflow", ONNX_MODULES[-1]):
        monkeypatch.setitem(sys.modules, name, None)  # not installed
    early = preflight_problems(cfg)
    late = []
    for refuse in (import_peft, lambda: check_installed(["mlflow"])):
        with pytest.raises(KilnError) as caught:
            refuse()
        late.append(str(caught.value))
    with pytest.raises(KilnError) as caught:
        RunDir(work / "run").check_free(overwrite=False)
    late.append(str(caught.value))
    assert early == late
    with pytest.raises(KilnError, match="ONNX export needs"):  # what on_finish meets first
        opset_range()


# ---- kiln sweep -----------------------------------------------------------------------------


def _sweep_file(work: Path, space: dict[str, Any], **changes: Any) -> None:
    raw = {**TINY, **changes}
    raw["sweep"] = {"method": "random", "trials": 2, "space": space, "plots": False}
    (work / "sweep.yaml").write_text(yaml.safe_dump(raw))


def test_a_sweep_parameter_path_that_is_no_key(work: Path) -> None:
    """A sweep parameter path that names no config key is answered before torch loads (the
    key meant suggested), one line, exit 2."""
    _sweep_file(work, {"optim.lrr": {"low": 1e-4, "high": 1e-2, "log": True}})
    code, err, _ = _kiln(work, "-q", "sweep", "sweep.yaml")
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("kiln: error: sweep.yaml: sweep.space.optim.lrr: "), err
    assert "optim.lr" in err[0]  # the key meant


def test_a_sweep_whose_base_config_names_a_missing_file(work: Path) -> None:
    _sweep_file(
        work,
        {"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
        data={"train": "corpus/gone.jsonl", "max_length": 32},
    )
    code, err, _ = _kiln(work, "-q", "sweep", "sweep.yaml")
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("kiln: error: sweep.yaml: data.train: "), err
    assert "gone.jsonl" in err[0]
