"""`kiln report RUN_DIR`: the summary table and report.md with the plots embedded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import tiny_config

from kiln import Trainer
from kiln.cli import main
from kiln.config import dump_yaml
from kiln.report import best_metrics, load_report


def _table(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(\S.*?)\s{2,}(.*)$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_report_of_a_finished_run(
    tmp_path: Path, recipe_files, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(tmp_path, *recipe_files, eval={"every_steps": 5}, log={"plots": False})
    result = Trainer(cfg).fit()
    run = cfg.run_dir
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    summary = result.summary

    assert main(["report", str(run)]) == 0
    rows = _table(capsys.readouterr().out)
    assert rows["run"] == "tiny (causal_lm)"
    assert rows["model"].startswith("gpt2 from scratch (2 layers, hidden 32); ")
    assert rows["steps"] == "20"
    assert rows["tokens"] == f"{summary['tokens']:,}"
    assert rows["tokens/s"] == f"{summary['tokens_per_s']:,.1f}"
    assert rows["final model"] == str(result.final_dir)
    best = min(val, key=lambda r: r["val_loss"])
    assert rows["best val_loss"] == f"{best['val_loss']:.4f} (step {best['step']})"
    top = max(val, key=lambda r: r["val_accuracy"])
    assert rows["best val_accuracy"] == f"{top['val_accuracy']:.4f} (step {top['step']})"
    assert rows["final train loss"] == f"{summary['final_train_loss']:.4f} (step 20)"

    # The run had no plots: the report draws them, and report.md embeds each one.
    md = (run / "report.md").read_text()
    assert md.startswith("# Run report: tiny\n")
    assert "| steps | 20 |" in md
    embedded = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert embedded[:2] == ["plots/loss.png", "plots/lr.png"]
    assert {"plots/val_ppl.png", "plots/val_accuracy.png"} <= set(embedded)
    for rel in embedded:
        assert (run / rel).read_bytes()[:4] == b"\x89PNG"


def test_report_of_an_unfinished_run(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(tmp_path, *recipe_files, log={"plots": True})
    run = cfg.run_dir
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    lines = [
        {
            "step": 5,
            "split": "train",
            "loss": 4.0,
            "lr": 1e-3,
            "tokens": 640,
            "elapsed_s": 2.0,
            "tokens_per_s": 320.0,
        },
        {"step": 5, "split": "val", "val_loss": 3.5, "val_ppl": 33.1, "loss": 3.5},
        {
            "step": 10,
            "split": "train",
            "loss": 3.0,
            "lr": 1e-3,
            "tokens": 1280,
            "elapsed_s": 75.5,
            "tokens_per_s": 300.0,
        },
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = load_report(run)
    rows = dict(report.rows)
    assert rows["status"] == "no summary.json: still running, failed or killed"
    assert rows["steps"] == "10 logged of 20"
    assert rows["tokens"] == "1,280"
    assert rows["wall time"] == "1m 15.5s"
    assert rows["best val_loss"] == "3.5000 (step 5)"
    assert rows["final model"] == "not written"


def test_report_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"kiln: error: {tmp_path / 'nope'}: no such run directory\n"
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"kiln: error: {tmp_path}: not a kiln run directory (no config.yaml)\n"
    )
    (tmp_path / "config.yaml").write_text("- not\n- a mapping\n")
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"kiln: error: {tmp_path / 'config.yaml'}: not a kiln config "
        "(expected a mapping of sections)\n"
    )
    (tmp_path / "config.yaml").write_text("name: r\n")
    (tmp_path / "summary.json").write_text('{"steps": 3')  # not whole
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kiln: error: {tmp_path / 'summary.json'}: cannot read (Expecting")
    assert err.count("\n") == 1


def test_best_metrics_direction() -> None:
    rows = [
        {
            "step": 1,
            "split": "val",
            "val_loss": 2.0,
            "val_ppl": 7.4,
            "val_accuracy": 0.3,
            "val_bleu": 10.0,
            "val_wer": 0.5,
        },
        {
            "step": 2,
            "split": "val",
            "val_loss": 1.5,
            "val_ppl": 4.5,
            "val_accuracy": 0.5,
            "val_bleu": 12.0,
            "val_wer": 0.6,
        },
        {
            "step": 3,
            "split": "val",
            "val_loss": 1.7,
            "val_ppl": 5.5,
            "val_accuracy": 0.4,
            "val_bleu": 11.0,
            "val_wer": 0.4,
        },
        {"step": 3, "split": "train", "loss": 0.1},
    ]
    assert best_metrics(rows) == {
        "val_loss": (1.5, 2),
        "val_ppl": (4.5, 2),
        "val_accuracy": (0.5, 2),
        "val_bleu": (12.0, 2),
        "val_wer": (0.4, 3),
    }


def test_report_includes_kiln_eval_results(
    tmp_path: Path, recipe_files, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 4},
        checkpoint={"every_steps": 4},
        log={"plots": False},
    )
    Trainer(cfg).fit()
    run, (_, val) = cfg.run_dir, recipe_files
    assert main(["report", str(run)]) == 0
    assert "kiln eval results" not in capsys.readouterr().out  # none yet
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "notes.json").write_text('["not a report"]')  # the user's own file
    assert main(["eval", str(run), "--data", str(val)]) == 0
    assert (
        main(
            [
                "eval",
                str(run / "checkpoints" / "step-4"),
                "--data",
                str(val),
                "--out",
                str(run / "eval" / "ckpt.json"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    final = json.loads((run / "eval" / "val.json").read_text())
    ckpt = json.loads((run / "eval" / "ckpt.json").read_text())
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out.split("kiln eval results\n")[1].splitlines()
    assert out[0].split() == ["weights", "data", "examples", *final["metrics"]]
    assert out[1].split() == [
        "final",
        str(val),
        str(final["examples"]),
        *(f"{v:,.4f}" for v in final["metrics"].values()),
    ]
    assert out[2].split()[:2] == ["checkpoints/step-4", str(val)]
    assert out[2].split()[3] == f"{ckpt['metrics']['val_loss']:.4f}"
    md = (run / "report.md").read_text()
    assert "## kiln eval results" in md
    assert f"| final | {val} | {final['examples']} | {final['metrics']['val_loss']:.4f} |" in md
