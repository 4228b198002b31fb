"""`kiln train` answers a bad config before loading torch, and suggests the key meant."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kiln.config import RunConfig
from kiln.config.base import ConfigError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def _kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, cwd=ROOT
    )


def _median_s(*args: str, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = _kiln(*args)
        times.append(time.perf_counter() - start)
        assert done.returncode == 2, done.stderr
    return statistics.median(times)


def test_a_bad_key_is_answered_as_fast_as_config_validate(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    raw = yaml.safe_load(Path(QUICKSTART).read_text())
    raw["train"]["batchsize"] = raw["train"].pop("batch_size")
    bad.write_text(yaml.safe_dump(raw))
    validate = _median_s("config", "validate", str(bad))
    train = _median_s("train", str(bad))
    # Loading torch and transformers took ~5 s here, against ~0.6 s for validation.
    assert train < 1.5 * validate + 0.3, (train, validate)
    done = _kiln("train", str(bad))
    assert done.stderr.startswith("kiln: error: ")
    assert done.stderr.endswith(
        "bad.yaml: train.batchsize: unknown key; did you mean train.batch_size?\n"
    )
    assert done.stderr.count("\n") == 1


def test_torch_is_not_imported_before_the_config_is_refused() -> None:
    code = (
        "import sys; from kiln.cli import main; "
        f"rc = main(['train', {QUICKSTART!r}, 'optim.lr=-1']); "
        "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["2", "False", "False"], done.stderr
    assert "optim.lr" in done.stderr


@pytest.mark.parametrize(
    ("override", "meant"),
    [
        ("train.batchsize=8", "train.batch_size"),
        ("train.lr=1e-3", "optim.lr"),
        ("train.epochs=3", "train.num_epochs"),
        ("model.hiden_size=64", "model.hidden_size"),
        ("trian=3", "train"),
        ("train.distributed.strategi=ddp", "train.distributed.strategy"),
    ],
)
def test_unknown_override_suggests_the_key(override: str, meant: str) -> None:
    done = _kiln("config", "validate", QUICKSTART, override)
    assert done.returncode == 2
    key = override.partition("=")[0]
    assert done.stderr.strip().endswith(f"{key}: unknown key; did you mean {meant}?")
    assert "Traceback" not in done.stderr


def test_nothing_close_suggests_nothing() -> None:
    done = _kiln("config", "validate", QUICKSTART, "zzzz.qqqq=1")
    assert done.stderr.strip().endswith("zzzz: unknown key")


@pytest.mark.parametrize(
    ("flags", "hint"),
    [
        (
            ["--epochs", "5"],
            "unknown option --epochs; config values are dotted overrides: train.num_epochs=5",
        ),
        (
            ["--train.max_steps=7"],
            "unknown option --train.max_steps; config values are dotted "
            "overrides: train.max_steps=7",
        ),
        (
            ["--lr", "1e-3"],
            "unknown option --lr; config values are dotted overrides: optim.lr=1e-3",
        ),
        (
            ["--batch-size", "8"],
            "unknown option --batch-size; config values are dotted overrides: train.batch_size=8",
        ),
        (
            ["--learning-rate", "3e-4"],
            "unknown option --learning-rate; config values are dotted overrides: optim.lr=3e-4",
        ),
    ],
)
def test_dashed_flag_says_how_to_write_the_override(flags: list[str], hint: str) -> None:
    done = _kiln("train", QUICKSTART, *flags)
    assert (done.returncode, done.stderr) == (2, f"kiln: error: {hint}\n")


def test_other_unknown_flags_keep_argparse_message() -> None:
    done = _kiln("train", QUICKSTART, "--frobnicate")
    assert (done.returncode, done.stderr) == (
        2,
        "kiln: error: unrecognized arguments: --frobnicate\n",
    )


def test_python_configs_get_the_suggestion_too() -> None:
    with pytest.raises(
        ConfigError,
        match=r"train\.batchsize: unknown key; did you mean "
        r"train\.batch_size\?",
    ):
        RunConfig().replace(**{"train.batchsize": 4})


def test_the_engine_loads_no_model_or_generation_code_until_a_run_builds_one() -> None:
    """Issue 29 item 2: importing the trainer (whose generation eval and sample code reach
    `kiln.models`) loads none of transformers; a run imports it when it builds the model."""
    heavy = ("transformers", "kiln.models.build", "kiln.models.tokenizer", "peft", "matplotlib")
    code = (
        "import sys; import kiln.engine.trainer, kiln.engine.generate_eval, kiln.models; "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr
    lazy = "import sys; from kiln.models import build_model; print('transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", lazy], capture_output=True, text=True)
    assert done.stdout.strip() == "True", done.stderr
