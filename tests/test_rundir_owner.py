"""Issue 27 item 1: kiln.runs owns the run directory (its layout, the run states and their
exit codes, the rollback-aware metrics follower, `run_dir_of`), and nothing else defines
them again."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import tiny_raw

from kiln.config import load_config
from kiln.engine.rundir import RunDir
from kiln.runs import (
    ACTIVE_STATES,
    END_STATES,
    STATE_EXIT_CODES,
    STATES,
    ExitCode,
    MetricsTail,
    RunPaths,
    read_metrics,
)


def test_item01_exit_codes_keep_their_values() -> None:
    assert {code.name: int(code) for code in ExitCode} == {
        "FINISHED": 0,
        "FAILED": 1,
        "BAD_INPUT": 2,
        "PAUSED": 3,
        "DIVERGED": 4,
        "STORAGE_FULL": 5,
        "ABORTED": 130,
    }


def test_item01_every_end_state_has_its_exit_code() -> None:
    assert set(ACTIVE_STATES) | set(END_STATES) == set(STATES)
    assert not set(ACTIVE_STATES) & set(END_STATES)
    assert set(STATE_EXIT_CODES) == set(END_STATES)
    assert STATE_EXIT_CODES == {
        "finished": 0,
        "paused": 3,
        "stopped": 3,  # a pruned trial: resumable, as today
        "diverged": 4,
        "failed": 1,
    }


def test_item01_final_state_reads_the_table() -> None:
    from kiln.engine.control import StopRequest
    from kiln.engine.status import final_state

    assert final_state(None) == ("finished", ExitCode.FINISHED)
    cases = {
        "diverged": StopRequest("diverged", "loss is nan", resumable=False, write_final=False),
        "paused": StopRequest("signal", "SIGTERM", resumable=True, write_final=False),
        "stopped": StopRequest("pruned", "sweep", resumable=False, write_final=False),
        "finished": StopRequest("early_stop", "patience", resumable=False, write_final=True),
    }
    for state, stop in cases.items():
        assert final_state(stop) == (state, STATE_EXIT_CODES[state])


def _line(step: int, loss: float) -> dict[str, object]:
    return {"step": step, "split": "train", "loss": loss}


def test_item01_tail_follows_appends(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    tail = MetricsTail(run)
    assert tail.read() == ([], False)  # no file yet
    path = RunPaths(run).metrics
    path.write_text(json.dumps(_line(1, 2.0)) + "\n" + json.dumps(_line(2, 1.5))[:7])
    assert tail.read() == ([_line(1, 2.0)], False)
    with open(path, "a") as f:  # the torn line completes, another follows
        f.write(json.dumps(_line(2, 1.5))[7:] + "\n" + json.dumps(_line(3, 1.0)) + "\n")
    assert tail.read() == ([_line(2, 1.5), _line(3, 1.0)], False)
    assert tail.read() == ([], False)
    assert tail.records == [_line(1, 2.0), _line(2, 1.5), _line(3, 1.0)]
    assert tail.offset == path.stat().st_size


def test_item01_tail_sees_a_resume_rewrite_at_a_line_start(
    tmp_path: Path, recipe_files: tuple[Path, Path]
) -> None:
    """The engine's resume (and anomaly rollback) replaces metrics.jsonl with the history up
    to the checkpoint, then logs again: the new file grows past the old offset, which falls
    on a line start of it (lines of equal length), so only the file's identity shows it."""
    run = tmp_path / "run"
    cfg = load_config(data=tiny_raw(tmp_path, *recipe_files))
    rundir = RunDir(run)
    rundir.prepare(cfg, overwrite=False)
    for step in range(1, 5):
        rundir.log_metrics(_line(step, 1.5))
    tail = MetricsTail(run)
    new, rewritten = tail.read()
    assert (len(new), rewritten) == (4, False)
    offset = tail.offset

    rundir.resume(cfg, 2, anomalies=False)  # a rollback to step 2's checkpoint
    for step in range(3, 7):
        rundir.log_metrics(_line(step, 2.5))  # same length as the dropped lines
    rundir.close()
    history = [_line(1, 1.5), _line(2, 1.5)] + [_line(s, 2.5) for s in range(3, 7)]
    # The offset rule alone misses it: it reads on from the old offset as if appended.
    assert read_metrics(run, offset)[0] == history[4:]

    new, rewritten = tail.read()
    assert rewritten is True
    assert new == history  # the whole new history, re-read from byte 0
    assert tail.records == history  # the dropped rows (steps 3, 4 at 1.5) are gone
    assert tail.read() == ([], False)
    rundir.log_metrics(_line(7, 2.5))
    rundir.close()
    assert tail.read() == ([_line(7, 2.5)], False)
    assert tail.records == [*history, _line(7, 2.5)]


def test_item01_tail_sees_a_shorter_file_and_a_removed_one(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    path = RunPaths(run).metrics
    lines = [json.dumps(_line(s, 1.0)) + "\n" for s in range(1, 5)]
    path.write_text("".join(lines))
    tail = MetricsTail(run)
    assert len(tail.read()[0]) == 4
    with open(path, "r+") as f:  # cut in place (same file): the offset rule sees it
        f.truncate(len("".join(lines[:2])))
    assert tail.read() == ([_line(1, 1.0), _line(2, 1.0)], True)
    assert tail.records == [_line(1, 1.0), _line(2, 1.0)]
    path.unlink()  # a run started afresh (--overwrite) removes it
    assert tail.read() == ([], True)
    assert tail.records == []
    path.write_text(lines[0])
    assert tail.read() == ([_line(1, 1.0)], False)


@pytest.mark.parametrize(
    ("where", "resumed"),
    [("run", "run"), ("ckpt", "run"), ("final", None), ("bare_ckpt", None), ("empty", None)],
)
def test_item01_train_resume_uses_run_dir_of(tmp_path: Path, where: str, resumed: str) -> None:
    """`kiln train --resume PATH`: a run with its config and checkpoints/, or one of its
    checkpoints with a manifest; final/ and a checkpoint still without manifest are not."""
    from kiln.commands.train import _resumed_run

    run = tmp_path / "run"
    paths = RunPaths(run)
    paths.checkpoint(4).mkdir(parents=True)
    (paths.checkpoint(4) / "manifest.json").write_text("{}")
    paths.checkpoint(6).mkdir()
    paths.final.mkdir()
    paths.config.write_text("name: r\n")
    (tmp_path / "empty").mkdir()
    target = {
        "run": run,
        "ckpt": paths.checkpoint(4),
        "final": paths.final,
        "bare_ckpt": paths.checkpoint(6),
        "empty": tmp_path / "empty",
    }[where]
    assert _resumed_run(target) == (run if resumed else None)


# ---- a sweep follows a rollback ---------------------------------------------------------------


def _val(step: int, loss: float | None) -> dict[str, object]:
    return {"step": step, "split": "val", "val_loss": loss}


def test_item01_sweep_follows_a_rollback_of_its_trial(
    tmp_path: Path, recipe_files: tuple[Path, Path]
) -> None:
    """A trial's run rolls back (what an anomaly rollback does: `RunDir.resume` to the
    checkpoint's step, `anomalies=False`) while the sweep's controller follows it: the study
    and the trial's best hold the new history, not the validations the rollback dropped."""
    pytest.importorskip("optuna")
    from kiln.sweep.controller import Controller, _best
    from kiln.sweep.study import sweep_from_dict

    raw = tiny_raw(tmp_path, *recipe_files)
    space = {"optim.lr": [0.001, 0.002]}
    raw["sweep"] = {"method": "grid", "trials": 2, "space": space, "pruner": {"type": "none"}}
    sweep = sweep_from_dict(raw, "sweep.yaml", tmp_path / "sweep")
    controller = Controller(sweep)
    trial = controller._next()
    assert trial is not None
    run = sweep.trial_dir(trial.number)
    cfg = load_config(data=tiny_raw(tmp_path, *recipe_files))
    rundir = RunDir(run)
    rundir.prepare(cfg, overwrite=False)
    tail = MetricsTail(run)

    def log(*records: dict[str, object]) -> None:
        for record in records:
            rundir.log_metrics(record)
        rundir.close()
        controller._follow(trial, tail)

    log(_line(1, 3.0), _val(2, 1.0), _line(3, 2.5), _val(4, 0.3), _val(6, None))
    assert trial.nonfinite  # step 6's NaN: as diverged, unless a rollback drops it
    rundir.resume(cfg, 2, anomalies=False)  # the rollback: back to step 2's checkpoint
    log()
    assert (trial.reported, trial.nonfinite) == ({2}, False)
    log(_line(3, 2.6), _val(4, 0.8), _val(6, 0.7))

    frozen = controller.study.get_trials(deepcopy=False)[trial.number]
    assert frozen.intermediate_values == {2: 1.0, 4: 0.8, 6: 0.7}  # step 4's 0.3 was dropped
    assert _best(tail.records, "val_loss", "min") == (0.7, 6)
    assert [r["step"] for r in tail.records] == [1, 2, 3, 4, 6]


# ---- the guard: one definition of the layout, the states and the exit codes -----------------

PACKAGE = Path(__file__).resolve().parent.parent / "kiln"
OWNER = "rundir/layout.py"
"""Where the layout names are defined."""
OWNERS = ("runs.py", "rundir/")
"""The owner: kiln/runs.py (the public face) and the kiln/rundir/ package behind it."""
RUN_STATE_NAMES = {"starting", "running", "paused", "finished", "failed", "diverged", "stopped"}

# (module, literal) pairs that look like a run-directory name but are not one of its paths.
# None today: a checkpoint kind "final", the summary's "checkpoints" key and the docstrings
# naming step-N are not path uses, and the guard only counts a directory name used as a path.
NOT_PATHS: dict[tuple[str, str], str] = {
    # A token shard set's own manifest (docs/data.md), a file of the data cache, not of a run.
    ("data/shards/format.py", "manifest.json"): "the shard set's manifest",
}
# Names still to move to kiln.runs while a change is in flight: {(module, literal): "why"}.
# None left (issue 27 moved every one).
TO_MOVE: dict[tuple[str, str], str] = {}


def _layout_names() -> tuple[set[str], set[str], str]:
    """(file names, directory names, the checkpoint prefix) as the owner defines them: its
    module-level string constants (read with ast, so the guard follows the owner)."""
    files, dirs, prefix = set(), set(), ""
    for node in ast.parse((PACKAGE / OWNER).read_text()).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target, value = node.targets[0], node.value
        if not (isinstance(target, ast.Name) and isinstance(value, ast.Constant)):
            continue
        if not isinstance(value.value, str) or not target.id.isupper():
            continue
        if target.id == "STEP_PREFIX":
            prefix = value.value
        elif "." in value.value:
            files.add(value.value)
        else:
            dirs.add(value.value)
    return files, dirs, prefix


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that stand alone as statements (docstrings)."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }


def _path_operands(tree: ast.AST) -> Iterator[ast.AST]:
    """The expressions used as a path component: either side of `/`, the arguments of Path(),
    joinpath(), os.path.join(), glob() and rglob(), and what a `.name` is compared with."""
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            yield node.left
            yield node.right
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("Path", "PurePath", "joinpath", "join", "glob", "rglob"):
                yield from node.args
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr in ("name", "stem") for s in sides):
                yield from sides


def _strings(node: ast.AST) -> Iterator[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.JoinedStr):
        for part in node.values:
            yield from _strings(part)


def _findings() -> list[tuple[str, int, str, str]]:
    """(module, line, what, text) of each definition outside the owner."""
    layout = _layout_names()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        if not (module == OWNERS[0] or module.startswith(OWNERS[1])):
            found += _module_findings(module, path.read_text(), layout)
    return sorted(set(found))


def _module_findings(
    module: str, source: str, layout: tuple[set[str], set[str], str]
) -> list[tuple[str, int, str, str]]:
    files, dirs, prefix = layout
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):  # a file name, or the checkpoint prefix, anywhere
        if not isinstance(node, ast.Constant) or id(node) in docs:
            continue
        text = node.value
        if not isinstance(text, str):
            continue
        if text in files or ("/" in text and text.rpartition("/")[2] in files):
            found.append((module, node.lineno, "file name", text))
        elif text.startswith(prefix):
            found.append((module, node.lineno, "checkpoint name", text))
    for operand in _path_operands(tree):  # a directory name used as a path
        for text in _strings(operand):
            if text.split("/")[0] in dirs:
                found.append((module, operand.lineno, "directory name", text))
    found += [(module, line, what, text) for line, what, text in _definitions(tree)]
    return found


def _definitions(tree: ast.Module) -> Iterator[tuple[int, str, str]]:
    """Module-level exit-code constants (EXIT_*), IntEnums, and run-state tuples."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
            if bases & {"IntEnum", "IntFlag"} or node.name.lower().startswith("exit"):
                yield node.lineno, "exit-code enum", node.name
            continue
        if isinstance(node, ast.Assign):
            targets = [t for t in node.targets if isinstance(t, ast.Name | ast.Tuple)]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        else:
            continue
        for name in names:
            if name.upper().startswith("EXIT_"):
                yield node.lineno, "exit-code constant", name
        value = node.value
        if isinstance(value, ast.Tuple | ast.List | ast.Set):
            states = [e.value for e in value.elts if isinstance(e, ast.Constant)]
            run_states = [s for s in states if s in RUN_STATE_NAMES]
            named_states = any(n.upper().endswith("STATES") for n in names)
            if len(run_states) >= 4 or (named_states and run_states):
                yield node.lineno, "run-state tuple", ", ".join(names)


def test_item01_guard_one_owner_for_layout_states_and_exit_codes() -> None:
    found = _findings()
    allowed = {**NOT_PATHS, **TO_MOVE}
    unexpected = [f for f in found if (f[0], f[3]) not in allowed]
    assert not unexpected, (
        "defined again outside kiln/runs.py, kiln/rundir/ (use RunPaths, ExitCode):\n"
        + ("\n".join(f"kiln/{m}:{line}: {what} {text!r}" for m, line, what, text in unexpected))
    )
    # A NOT_PATHS entry that no longer matches is stale; TO_MOVE entries may go meanwhile
    # (another helper moving them), and the lead removes them then.
    stale = sorted(set(NOT_PATHS) - {(f[0], f[3]) for f in found})
    assert not stale, f"allowed but no longer found: remove them from NOT_PATHS: {stale}"


PLANTED = """
import enum
EXIT_PAUSED = 3
class Codes(enum.IntEnum):
    OK = 0
STATES = ("queued", "running")
ENDED = ("paused", "finished", "failed", "diverged")
def f(run, step):
    run / "checkpoints" / f"step-{step}"
    (run / "metrics.jsonl").read_text()
    open(f"{run}/status.json")
    Path(run, "final")
    run.glob("samples/*.jsonl")
    if run.name == "final":
        pass
    kind = "final"  # a checkpoint kind, not a path: allowed
    return {"checkpoints": [], "final": True}  # keys, not paths: allowed
"""


def test_item01_guard_finds_each_kind_of_second_definition() -> None:
    found = {
        (line, what) for _, line, what, _ in _module_findings("m.py", PLANTED, _layout_names())
    }
    assert found == {
        (3, "exit-code constant"),
        (4, "exit-code enum"),
        (6, "run-state tuple"),
        (7, "run-state tuple"),
        (9, "directory name"),
        (9, "checkpoint name"),
        (10, "file name"),
        (11, "file name"),
        (12, "directory name"),
        (13, "directory name"),
        (14, "directory name"),
    }


def test_item01_docs_list_the_exit_codes_of_the_one_table() -> None:
    root = PACKAGE.parent
    readme = (root / "README.md").read_text()
    table = readme[readme.index("Exit codes of `kiln`") :]
    listed = {int(m) for m in re.findall(r"^\| (\d+) \|", table, flags=re.M)}
    assert {int(code) for code in ExitCode} <= listed  # (and 143: a signal, not an ExitCode)
    doc = (root / "docs" / "architecture.md").read_text()
    for state, code in STATE_EXIT_CODES.items():
        rows = re.findall(rf"^\| `{state}` \|.*\| ([^|]+) \|$", doc, flags=re.M)
        codes = [set(row.strip().split(" / ")) for row in rows]  # failed: "2 / 5 / 1"
        assert any(str(int(code)) in c for c in codes), (state, rows)
