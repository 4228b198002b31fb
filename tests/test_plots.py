"""Plots: per-run PNGs at the end of training, and `kiln plot` overlaying several runs."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import tiny_config

from kiln import Trainer
from kiln.callbacks.defaults import default_callbacks
from kiln.callbacks.plotting import PlotsCallback
from kiln.cli import main
from kiln.plots import eval_metrics, plot_run, series
from kiln.registry import MissingExtra

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_shape(path: Path) -> tuple[int, ...]:
    """(H, W, C) of a PNG, decoded by matplotlib: a file that is not a valid PNG raises."""
    imread = pytest.importorskip("matplotlib.image").imread

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    return imread(path).shape


def fake_run(root: Path, name: str, scale: float = 1.0) -> Path:
    """A run directory with config.yaml and a metrics.jsonl of 20 steps (torn last line)."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"name": name}))
    lines = []
    for step in range(5, 21, 5):
        train = {"step": step, "split": "train", "loss": scale * 5 / step, "lr": 1e-3 / step}
        lines.append({**train, "epoch": 0, "grad_norm": 1.0, "tokens": 100 * step})
        val = {"step": step, "split": "val", "val_loss": scale * 4 / step, "val_ppl": 9.0 / step}
        counts = {"val_tokens": 900.0, "val_gen_samples": 4, "val_gen_time_s": 0.5}
        lines.append({**val, "val_accuracy": step / 40, **counts, "loss": 4 / step})
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 25, "spl'
    (run / "metrics.jsonl").write_text(text)
    return run


def test_series_and_eval_metrics_read_metrics_jsonl(tmp_path: Path) -> None:
    from kiln.plots import read_metrics

    records = read_metrics(fake_run(tmp_path, "a"))
    assert len(records) == 8  # the torn line is skipped
    assert series(records, "train", "loss") == ([5, 10, 15, 20], [1.0, 0.5, 5 / 15, 0.25])
    assert series(records, "val", "loss") == ([5, 10, 15, 20], [0.8, 0.4, 4 / 15, 0.2])
    assert eval_metrics(records) == ["val_ppl", "val_accuracy"]  # not counts, timings, loss


def test_plot_run_writes_one_valid_png_per_curve(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "a")
    written = plot_run(run)
    names = ["loss", "lr", "grad_norm", "val_ppl", "val_accuracy"]
    assert written == [run / "plots" / f"{n}.png" for n in names]
    for path in written:
        assert png_shape(path) == (400, 640, 4)
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(f"{n}.png" for n in names)


def test_kiln_plot_overlays_two_runs_in_one_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = fake_run(tmp_path, "a"), fake_run(tmp_path, "b", scale=2.0)
    out = tmp_path / "cmp" / "compare.png"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert png_shape(out) == (800, 1280, 4)  # 2 x 2 panels: loss, lr, val_ppl, val_accuracy
    assert [p.name for p in out.parent.iterdir()] == ["compare.png"]
    one = tmp_path / "loss.png"
    assert main(["plot", str(a), str(b), "--out", str(one), "--metrics", "loss"]) == 0
    assert png_shape(one) == (400, 640, 4)


def test_kiln_plot_on_a_directory_without_metrics_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = fake_run(tmp_path, "a")
    missing = tmp_path / "nope"
    assert main(["plot", str(a), str(missing), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"kiln: error: {missing}: not a kiln run directory (no metrics.jsonl)"]
    assert not (tmp_path / "x.png").exists()


def test_training_writes_plots_unless_switched_off(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(tmp_path / "on", *recipe_files, eval={"every_steps": 10}, log={"plots": True})
    Trainer.from_config(cfg).fit()
    plots = cfg.run_dir / "plots"
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["grad_norm.png", "loss.png", "lr.png", "val_accuracy.png", "val_ppl.png"]
    for png in plots.iterdir():
        assert png_shape(png)[2] == 4

    off = tiny_config(tmp_path / "off", *recipe_files, log={"plots": False})
    assert not any(isinstance(cb, PlotsCallback) for cb in default_callbacks(off))


def test_missing_matplotlib_is_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    run = fake_run(tmp_path, "a")
    with caplog.at_level(logging.WARNING, logger="kiln"):
        PlotsCallback().on_train_end(SimpleNamespace(run_dir=run))  # type: ignore[arg-type]
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("log.plots needs matplotlib")
    assert message.endswith("pip install 'kiln[plots]'; no plots drawn")
    assert not (run / "plots").exists()


def test_kiln_plot_without_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    a = fake_run(tmp_path, "a")
    assert main(["plot", str(a), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("kiln: error: plots needs matplotlib (")
    assert err[0].endswith("install it with: pip install 'kiln[plots]'")
    with pytest.raises(MissingExtra):
        plot_run(a)
    assert not (a / "plots").exists()


def test_read_metrics_takes_a_whole_last_line_without_newline(tmp_path: Path) -> None:
    from kiln.plots import read_metrics

    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}')
    assert read_metrics(run) == [{"step": 1, "split": "train", "loss": 2.0}]
