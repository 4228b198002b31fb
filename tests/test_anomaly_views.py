"""Views of anomalies.jsonl: `kiln.runs.read_anomalies`, `kiln data show RUN --step N` (source
rows of unpacked data, decoded tokens of packed data), the Anomalies section of `kiln report`,
and the anomaly steps marked on the plots.

Two real tiny runs (packed and unpacked) are trained once; each test writes the anomalies.jsonl
it needs into them (the records as the engine writes them: `Parts.sources` for the sources)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import make_rows, tiny_config, write_jsonl

from kiln import Trainer
from kiln.anomalies import read_source_rows, summarize
from kiln.cli import main
from kiln.plots import ANOMALY_LABEL, anomaly_steps, loss_figure, plot_run, plot_runs
from kiln.report import load_report
from kiln.runs import read_anomalies


class Run:
    """A finished tiny run, with what its trainer built (the reference for the views)."""

    def __init__(self, root: Path, train_file: Path, val_file: Path, **data: Any) -> None:
        cfg = tiny_config(
            root,
            train_file,
            val_file,
            data=data,
            train={"max_steps": 4, "batch_size": 4},
            checkpoint={"every_steps": 2},
            log={"every_steps": 2, "progress": "none", "plots": False},
        )
        self.trainer = Trainer(cfg)
        self.trainer.fit()
        self.dir = cfg.run_dir
        self.train_file = train_file
        parts = self.trainer.parts
        assert parts is not None
        self.parts = parts

    def decoded(self, index: int) -> str:
        ids = self.parts.train_data[index]["input_ids"].tolist()
        return self.trainer.tokenizer.decode(ids)

    def record(self, step: int, samples: list[int], **fields: Any) -> dict[str, Any]:
        """A record as the engine writes it (non-finite loss, skipped, by default)."""
        return {
            "step": step,
            "micro_step": 2 * step - 1,
            "epoch": 0,
            "kind": "nan_loss",
            "value": "nan",
            "z": None,
            "action": "skip",
            "to_step": None,
            "samples": samples,
            "sources": self.parts.sources(samples),
            **fields,
        }

    def write(self, *records: dict[str, Any], tail: str = "") -> None:
        text = "".join(json.dumps(r) + "\n" for r in records) + tail
        (self.dir / "anomalies.jsonl").write_text(text)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("views-data")
    return (
        write_jsonl(tmp / "train.jsonl", make_rows(48, seed=5)),
        write_jsonl(tmp / "val.jsonl", make_rows(8, seed=6)),
    )


@pytest.fixture(scope="module")
def rows_run(tmp_path_factory: pytest.TempPathFactory, data: tuple[Path, Path]) -> Run:
    return Run(tmp_path_factory.mktemp("rows"), *data, packing=False)


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory: pytest.TempPathFactory, data: tuple[Path, Path]) -> Run:
    return Run(tmp_path_factory.mktemp("packed"), *data)


def show(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], list[str]]:
    """`kiln data show ARGS`: (exit code, stdout lines, stderr lines without the log)."""
    code = main(["-q", "data", "show", *args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


# ---- kiln.runs.read_anomalies ----------------------------------------------------------------


def test_read_anomalies_skips_a_torn_line_and_missing_is_empty(tmp_path: Path) -> None:
    assert read_anomalies(tmp_path) == []
    good = {"step": 3, "kind": "spike", "value": 9.5}
    lines = [json.dumps(good), "[1, 2]", '{"kind": "no step"}', json.dumps({**good, "step": 5})]
    (tmp_path / "anomalies.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "ki')
    assert [r["step"] for r in read_anomalies(tmp_path)] == [3, 5]


# ---- kiln data show: source rows -------------------------------------------------------------


def test_show_prints_the_source_rows_of_the_step(
    rows_run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = [5, 0, 31, 12]
    first = rows_run.record(3, samples)
    assert first["sources"] is not None  # unpacked rows: the engine knows each sample's line
    spike = rows_run.record(4, [1, 2], kind="spike", value=9.25, z=21.44, action="warn")
    rows_run.write(first, spike)

    code, out, err = show(capsys, str(rows_run.dir), "--step", "3", "--max-chars", "100000")
    assert (code, err) == (0, [])
    assert out[0] == "step 3: nan_loss nan, skip (epoch 0, micro-step 5, 4 samples)"
    file_lines = rows_run.train_file.read_text().splitlines()
    body = out[1:]
    assert len(body) == 2 * len(samples)
    for k, (index, where) in enumerate(zip(samples, first["sources"], strict=True)):
        path, line = where.rsplit(":", 1)
        assert path == str(rows_run.train_file)
        assert body[2 * k] == f"  sample {index}  {where}"
        row = json.loads(file_lines[int(line) - 1])
        assert body[2 * k + 1] == "    " + json.dumps(row, ensure_ascii=False)
        # The source is that sample's row: its tokens are the start of the row's text.
        assert row["text"].startswith(rows_run.decoded(index).strip())

    code, out, _ = show(capsys, str(rows_run.dir), "--step", "4")
    assert out[0] == "step 4: spike 9.25 (z 21.4), warn (epoch 0, micro-step 7, 2 samples)"


def test_show_cuts_rows_limits_samples_and_decodes_on_request(
    rows_run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = [7, 3, 20]
    record = rows_run.record(2, samples)
    rows_run.write(record)
    code, out, _ = show(capsys, str(rows_run.dir), "--step", "2", "--max-chars", "40")
    assert code == 0
    content = [line[4:] for line in out if line.startswith("    ")]
    assert len(content) == 3
    assert all(len(c) == 40 and c.endswith("…") for c in content)
    assert all(c.startswith('{"title": ') for c in content)

    code, out, _ = show(
        capsys, str(rows_run.dir), "--step", "2", "--samples", "1", "--decode", "--max-chars", "999"
    )
    assert code == 0
    assert out[0].startswith("samples decoded from the training data rebuilt from ")
    assert out[0].endswith(f"tokenizer: {rows_run.dir / 'final'})")
    assert out[2] == f"  sample 7  {record['sources'][0]}"
    assert out[4] == "    tokens: " + json.dumps(rows_run.decoded(7), ensure_ascii=False)
    assert out[5] == "  ... and 2 more samples (--samples)"


def test_show_lists_the_anomalies_without_a_step(
    rows_run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    rows_run.write(
        rows_run.record(2, [1, 2, 3, 4], action="rollback", to_step=2),
        rows_run.record(3, [5, 6, 7, 8], kind="spike", value=7.5, z=12.0, action="skip"),
    )
    code, out, _ = show(capsys, str(rows_run.dir))
    assert code == 0
    assert out == [
        "step 2: nan_loss nan, rollback to step 2 (epoch 0, micro-step 3, 4 samples)",
        "step 3: spike 7.5 (z 12.0), skip (epoch 0, micro-step 5, 4 samples)",
        "2 anomalies (1 non-finite, 1 spike): 1 rolled back, 1 skipped; see one with --step N",
    ]


# ---- kiln data show: packed data, decoded --------------------------------------------------


def test_show_decodes_packed_samples_from_the_rebuilt_data(
    packed_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = [9, 0, 14, 3]
    record = packed_run.record(4, samples, kind="inf_grad", value="inf")
    assert record["sources"] is None  # packed blocks are not rows
    packed_run.write(record)
    n = len(packed_run.parts.train_data)
    code, out, err = show(capsys, str(packed_run.dir), "--step", "4", "--max-chars", "100000")
    assert (code, err) == (0, [])
    assert out[0] == (
        f"samples decoded from the training data rebuilt from {packed_run.dir / 'config.yaml'} "
        f"({n} examples, packed blocks; tokenizer: {packed_run.dir / 'final'})"
    )
    assert out[1] == "step 4: inf_grad inf, skip (epoch 0, micro-step 7, 4 samples)"
    expected = []
    for index in samples:
        expected += [f"  sample {index}", "    " + json.dumps(packed_run.decoded(index))]
    assert out[2:] == expected

    # A diverged run has no final/: the tokenizer is rebuilt as the config says, and checked
    # against the newest checkpoint's fingerprint.
    copy = tmp_path / "diverged"
    shutil.copytree(packed_run.dir, copy)
    shutil.rmtree(copy / "final")
    code, out2, _ = show(capsys, str(copy), "--step", "4", "--max-chars", "100000")
    assert code == 0
    assert out2[0].endswith(f"({n} examples, packed blocks; tokenizer: rebuilt from the config)")
    assert out2[2:] == expected

    state_file = copy / "checkpoints" / "step-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["tokenizer"] = "0" * len(state["tokenizer"])  # same size: the checkpoint stays listed
    state_file.write_text(json.dumps(state))
    code, out, err = show(capsys, str(copy), "--step", "4")
    assert (code, out) == (2, [])
    assert err == [
        f"kiln: error: {copy / 'checkpoints' / 'step-4'}: the tokenizer rebuilt from the config "
        "is not the one the run trained with"
    ]


def test_show_refuses_data_that_changed_since_the_run(
    packed_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "changed"
    shutil.copytree(packed_run.dir, copy)
    n = len(packed_run.parts.train_data)
    (copy / "anomalies.jsonl").write_text(json.dumps(packed_run.record(2, [n])) + "\n")
    code, _, err = show(capsys, str(copy), "--step", "2")
    assert code == 2
    assert err == [
        f"kiln: error: {copy / 'anomalies.jsonl'}: sample {n} is out of range: the training "
        f"data rebuilt from {copy / 'config.yaml'} has {n} examples"
    ]
    stats = json.loads((copy / "data_stats.json").read_text())
    (copy / "data_stats.json").write_text(json.dumps({**stats, "train_examples": n + 5}))
    code, _, err = show(capsys, str(copy), "--step", "2")
    assert code == 2
    assert err == [
        f"kiln: error: {copy / 'config.yaml'}: the training data rebuilt from it has {n} "
        f"examples, the run had {n + 5} ({copy / 'data_stats.json'}): the data changed since "
        "the run"
    ]
    (copy / "data_stats.json").unlink()  # what a run on data given as Python objects lacks
    code, _, err = show(capsys, str(copy), "--step", "2")
    assert code == 2
    assert err == [
        f"kiln: error: {copy / 'data_stats.json'}: no such file: the run's training data was not "
        "built from its config (given as Python objects?), so its samples cannot be rebuilt"
    ]


# ---- kiln data show: errors ------------------------------------------------------------------


def test_show_errors_are_one_line_exit_2_naming_the_path(
    rows_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope"
    assert show(capsys, str(missing), "--step", "1") == (
        2,
        [],
        [f"kiln: error: {missing}: no such run directory"],
    )
    assert show(capsys, str(tmp_path), "--step", "1") == (
        2,
        [],
        [f"kiln: error: {tmp_path}: not a kiln run directory (no config.yaml or status.json)"],
    )
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(rows_run.dir / "config.yaml", bare / "config.yaml")
    assert show(capsys, str(bare), "--step", "1") == (
        2,
        [],
        [f"kiln: error: {bare / 'anomalies.jsonl'}: no such file (the run recorded no anomaly)"],
    )

    rows_run.write(rows_run.record(4, [1]), rows_run.record(2, [2]), rows_run.record(4, [3]))
    anomalies = rows_run.dir / "anomalies.jsonl"
    assert show(capsys, str(rows_run.dir), "--step", "3") == (
        2,
        [],
        [f"kiln: error: {anomalies}: no anomaly at step 3 (anomalies at: 2, 4)"],
    )
    with pytest.raises(SystemExit) as usage:  # argparse: one line, exit 2
        main(["data", "show", str(rows_run.dir), "--step", "0"])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert err == "kiln: error: argument --step: expected a positive integer, got '0'\n"

    # A source file that is gone, or shorter than the run's data was.
    gone = tmp_path / "gone.jsonl"
    rows_run.write({**rows_run.record(2, [1]), "sources": [f"{gone}:1"]})
    code, out, err = show(capsys, str(rows_run.dir), "--step", "2")
    assert (code, out, len(err)) == (2, [], 1)
    assert err[0].startswith(f"kiln: error: {gone}: no such file (a source of the run's samples")
    short = write_jsonl(tmp_path / "short.jsonl", make_rows(2))
    rows_run.write({**rows_run.record(2, [1]), "sources": [f"{short}:9"]})
    assert show(capsys, str(rows_run.dir), "--step", "2") == (
        2,
        [],
        [f"kiln: error: {short}: has no line 9 (the data changed since the run)"],
    )


def test_source_rows_of_json_csv_and_text_files(tmp_path: Path) -> None:
    rows = [{"a": 1, "b": "x"}, {"a": 2, "b": "y, z"}]
    pretty = tmp_path / "rows.json"
    pretty.write_text(json.dumps(rows, indent=2))  # each object spans 4 lines
    starts = [i + 1 for i, line in enumerate(pretty.read_text().splitlines()) if "{" in line]
    table = tmp_path / "rows.csv"
    table.write_text('a,b\n1,x\n2,"y, z"\n')
    text = tmp_path / "rows.txt"
    text.write_text("first line\nsecond line\n")
    sources = [f"{pretty}:{starts[1]}", f"{table}:3", f"{text}:2", "hf:some/set#4"]
    assert read_source_rows(sources) == {
        f"{pretty}:{starts[1]}": '{"a": 2, "b": "y, z"}',
        f"{table}:3": '{"a": "2", "b": "y, z"}',
        f"{text}:2": "second line",
    }


# ---- kiln report -----------------------------------------------------------------------------


def test_report_has_an_anomalies_section(
    rows_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(rows_run.dir, run)
    records = [
        rows_run.record(2, [1, 2, 3, 4]),
        rows_run.record(3, [5, 6, 7, 8], kind="spike", value=9.25, z=21.44, action="warn"),
        rows_run.record(4, [9, 10], kind="inf_grad", value="inf", action="rollback", to_step=2),
        rows_run.record(4, [11], kind="nan_grad", value="nan", action="stop"),
    ]
    (run / "anomalies.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    status = json.loads((run / "status.json").read_text())
    reason = "diverged at step 4: nan grad nan (train.anomaly.policy stop)"
    status.update(state="diverged", stop={"kind": "diverged", "reason": reason})
    (run / "status.json").write_text(json.dumps(status))

    summary = (
        "4 anomalies (3 non-finite, 1 spike): 1 rolled back, 1 skipped, 1 stopped, 1 warned; "
        f"the run diverged: {reason}"
    )
    assert summarize(records, status) == summary
    assert summarize(records[:1]) == "1 anomaly (1 non-finite): 1 skipped"
    report = load_report(run)
    assert dict(report.rows)["anomalies"] == summary
    assert main(["report", str(run), "--no-plots"]) == 0
    out = capsys.readouterr().out.splitlines()
    at = out.index("Anomalies")
    assert out[at + 1 : at + 6] == [
        "step  kind      value          action              samples",
        "2     nan_loss  nan            skip                4",
        "3     spike     9.25 (z 21.4)  warn                4",
        "4     inf_grad  inf            rollback to step 2  2",
        "4     nan_grad  nan            stop                1",
    ]
    md = (run / "report.md").read_text()
    assert f"## Anomalies\n\n{summary}\n\n| step | kind | value | action | samples |\n" in md
    assert "| 4 | inf_grad | inf | rollback to step 2 | 2 |" in md

    # No anomalies: no section.
    (run / "anomalies.jsonl").unlink()
    report = load_report(run)
    assert report.anomalies == []
    assert "anomalies" not in dict(report.rows)


# ---- plots -----------------------------------------------------------------------------------


def _marked(ax: Any) -> list[float]:
    """x of the vertical lines `mark_anomalies` drew on `ax` (the curves are Line2D)."""
    from matplotlib.collections import LineCollection

    lines = [c for c in ax.collections if isinstance(c, LineCollection)]
    return sorted(float(seg[0][0]) for c in lines for seg in c.get_segments())


def test_plots_mark_the_anomaly_steps(
    packed_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    import kiln.plots as plots

    packed_run.write(
        packed_run.record(3, [1]), packed_run.record(3, [2]), packed_run.record(4, [3])
    )
    assert anomaly_steps(packed_run.dir) == [3, 4]
    records = [json.loads(x) for x in (packed_run.dir / "metrics.jsonl").read_text().splitlines()]
    fig = loss_figure(records, "tiny", [3, 4])
    [ax] = fig.axes
    assert _marked(ax) == [3.0, 4.0]
    assert [c.get_label() for c in ax.collections] == [ANOMALY_LABEL]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "train loss",
        "val loss",
        "anomaly",
    ]
    [unmarked] = loss_figure(records, "tiny").axes
    assert _marked(unmarked) == []

    saved: dict[str, Any] = {}

    def save(fig: Any, path: Path) -> Path:
        saved[path.name] = fig
        return path

    monkeypatch.setattr(plots, "_save", save)
    plot_run(packed_run.dir, tmp_path / "plots")
    assert _marked(saved["loss.png"].axes[0]) == [3.0, 4.0]
    assert _marked(saved["grad_norm.png"].axes[0]) == [3.0, 4.0]
    assert _marked(saved["lr.png"].axes[0]) == []
    plot_runs([packed_run.dir], tmp_path / "overlay.png", metrics=["loss"])
    [loss_panel, *_] = saved["overlay.png"].axes
    assert _marked(loss_panel) == [3.0, 4.0]
    assert loss_panel.get_title() == "loss (train -, val --, anomalies :)"
