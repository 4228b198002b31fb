"""benchmarks/gpu_check.sh (issue 33): the dry run end to end on the CPU, and how the driver
judges steps (a failure with its error line, a hang, a skip, the budget) and the goals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


gc = load_script(SCRIPT, "bench_gpu_check")

STEPS = [
    "setup",
    "env",
    "smoke_bf16",
    "smoke_fp16",
    "smoke_fused_adamw",
    "smoke_compile",
    "smoke_flash",
    "smoke_qlora",
    "smoke_memory",
    "ddp_probe",
    "kiln_ddp",
    "bench_gpt2",
    "bench_lora",
    "pytest_gpu",
]
CUDA_ONLY = {"smoke_fp16", "smoke_qlora", "pytest_gpu"}


@pytest.mark.slow
def test_dry_run_runs_every_cpu_step_and_writes_one_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--no-setup"]
    done = subprocess.run(
        [*cmd, "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert [s["name"] for s in report["steps"]] == STEPS
    assert report["complete"]
    assert report["dry_run"]
    assert (steps["setup"]["status"], steps["setup"]["note"]) == ("skipped", "--no-setup")
    for name in set(STEPS) - CUDA_ONLY - {"setup"}:
        assert steps[name]["status"] == "ok", (name, steps[name]["note"])
        assert steps[name]["duration_s"] > 0
        assert (out / steps[name]["logs"][1]).exists()
    for name in CUDA_ONLY:
        assert (steps[name]["status"], steps[name]["note"]) == ("skipped", "no CUDA")
    assert report["counts"] == {"ok": 10, "failed": 0, "skipped": 4}
    assert report["environment"]["cuda_available"] is False
    assert report["environment"]["torch"].startswith("2.")
    assert steps["smoke_compile"]["detail"]["graphs"] >= 1
    assert steps["ddp_probe"]["detail"]["backend"] == "gloo"
    assert steps["kiln_ddp"]["detail"]["steps"] == 6
    for part in ("gpt2", "lora"):
        numbers = report["numbers"][part]
        for key in ("tokens_per_s", "peak_mem_mb", "loss_last10"):
            assert min(numbers[f"kiln_{key}"], numbers[f"hf_{key}"]) > 0, (part, key)
        assert numbers["speedup"] > 0
        assert numbers["loss_rel_diff"] >= 0
    assert report["numbers"]["gpt2"]["kiln_mfu"] > 0
    assert report["numbers"]["gpt2"]["hf_mfu"] > 0
    assert len(report["goals"]) == 2
    assert all(g["verdict"].startswith("not judged (dry run") for g in report["goals"])
    md = (out / "report.md").read_text()
    assert "MFU >= 50%" in md
    assert ">= 1.3x HF Trainer + PEFT" in md
    assert "**Dry run**" in md
    assert all(f"| {name} |" in md for name in STEPS)
    assert "## GPT-2 124M: kiln vs HF Trainer" in md
    assert "## LoRA r=16" in md


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failing_step_is_reported_with_its_error_line(tmp_path: Path) -> None:
    ctx = gc.Ctx(tmp_path, budget_s=60)
    noisy = (
        "import sys, warnings; print('loading...', file=sys.stderr); "
        "warnings.warn('a harmless warning'); "
        "raise ValueError('the real problem'); "
    )
    skip = (
        "import sys; print('bitsandbytes is not installed', file=sys.stderr); "
        f"sys.exit({gc.SKIP_EXIT})"
    )
    steps = [
        gc.Step("fine", "passes", lambda c: _python("print('fine')"), 30),
        gc.Step("broken", "raises", lambda c: _python(noisy), 30),
        gc.Step("hangs", "sleeps", lambda c: _python("import time; time.sleep(60)"), 1, min_s=0),
        gc.Step("optional", "skips itself", lambda c: _python(skip), 30),
        gc.Step("gpu", "needs CUDA", lambda c: _python("print(1)"), 30, needs_cuda=True),
        gc.Step("big", "wants more time", lambda c: _python("print(1)"), 30, min_s=600),
        gc.Step("nowhere", "no such program", lambda c: ["/nonexistent/program"], 30),
    ]
    seen: list[int] = []
    outcomes = gc.run_steps(steps, ctx, lambda so_far: seen.append(len(so_far)))
    got = {o.name: (o.status, o.note) for o in outcomes}
    assert got["fine"] == ("ok", "")
    assert got["broken"] == ("failed", "ValueError: the real problem")
    assert got["hangs"][0] == "failed"
    assert got["hangs"][1].startswith("timed out after 1 s")
    assert got["optional"] == ("skipped", "bitsandbytes is not installed")
    assert got["gpu"] == ("skipped", "no CUDA")
    assert got["big"][0] == "skipped"
    assert got["big"][1].startswith("budget: ")
    assert got["nowhere"][0] == "failed"
    assert "/nonexistent/program" in got["nowhere"][1]
    assert seen == list(range(1, 8))  # the report is rewritten after every step
    assert next(o for o in outcomes if o.name == "hangs").duration_s < 15

    report = gc.write_report(ctx, outcomes, started_at="now", complete=True)
    assert report["counts"] == {"ok": 1, "failed": 3, "skipped": 3}
    saved = json.loads((tmp_path / "report.json").read_text())
    broken = next(s for s in saved["steps"] if s["name"] == "broken")
    assert (broken["status"], broken["note"]) == ("failed", "ValueError: the real problem")
    assert "a harmless warning" in (tmp_path / broken["logs"][1]).read_text()
    md = (tmp_path / "report.md").read_text()
    assert "| broken | failed |" in md
    assert "ValueError: the real problem" in md
    assert "not measured (bench_gpt2 not run)" in md


def test_an_unknown_step_is_refused_with_exit_2(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        gc.main(["--dry-run", "--out", str(tmp_path), "--only", "bench_gpt2,bench_gtp2"])
    assert exc.value.code == 2
    assert "unknown step(s) bench_gtp2; the steps: setup, env," in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_error_line_finds_the_rank_error_under_torchrun_and_skips_noise() -> None:
    torchrun = (
        "[rank0]: Traceback (most recent call last):\n"
        '[rank0]:   File "x.py", line 3, in <module>\n'
        "[rank0]: RuntimeError: NCCL error in: ProcessGroupNCCL.cpp:1, unhandled cuda error\n"
        "E1208 00:00:00 torch/distributed/elastic/multiprocessing/api.py] failed (exitcode: 1)\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
        "============================================================\n"
        "x.py FAILED\n"
        "------------------------------------------------------------\n"
    )
    assert gc.error_line(torchrun) == (
        "RuntimeError: NCCL error in: ProcessGroupNCCL.cpp:1, unhandled cuda error"
    )
    kiln_style = "building the model\nmodel.name_or_path: no such directory: /x\n"
    assert gc.error_line(kiln_style) == "model.name_or_path: no such directory: /x"
    pytest_out = "....F\nFAILED tests/test_x.py::test_y - AssertionError\n1 failed in 2s\n"
    assert gc.error_line("", pytest_out) == "FAILED tests/test_x.py::test_y - AssertionError"
    assert gc.error_line("\n=====\n  \n") == ""


def _bench(name: str, part: str, **numbers: float) -> object:
    return gc.Outcome(name, "", "ok", detail={part: numbers})


def test_goals_are_judged_on_real_numbers_and_never_on_a_dry_run(tmp_path: Path) -> None:
    gpt2 = _bench("bench_gpt2", "gpt2", kiln_mfu=0.52, hf_mfu=0.40)
    lora = _bench("bench_lora", "lora", speedup=1.45, loss_rel_diff=0.05)
    ctx = gc.Ctx(tmp_path)
    verdicts = [g["verdict"] for g in gc.goals(ctx, [gpt2, lora])]
    assert verdicts == ["met", "not met (losses 5.0% apart)"]
    lora.detail["lora"]["loss_rel_diff"] = 0.01
    gpt2.detail["gpt2"]["kiln_mfu"] = 0.49
    assert [g["verdict"] for g in gc.goals(ctx, [gpt2, lora])] == ["not met", "met"]
    assert gc.goals(ctx, [gpt2, lora])[0]["value"] == "49.0% (HF Trainer 40.0%)"
    failed = gc.Outcome("bench_lora", "", "failed", note="CUDA out of memory")
    assert gc.goals(ctx, [gpt2, failed])[1]["verdict"] == (
        "not measured (bench_lora failed: CUDA out of memory)"
    )
    dry = gc.Ctx(tmp_path, dry_run=True)
    assert all(g["verdict"].startswith("not judged") for g in gc.goals(dry, [gpt2, lora]))


def test_goal_thresholds_match_the_benchmark() -> None:
    bench = load_script(SCRIPT.with_name("gpu_throughput.py"), "bench_gpu_tp")
    assert (gc.MFU_GOAL, gc.LORA_SPEEDUP_GOAL, gc.EQUAL_LOSS) == (
        bench.MFU_GOAL,
        bench.LORA_SPEEDUP_GOAL,
        bench.EQUAL_LOSS,
    )


def test_setup_keeps_a_cuda_torch_and_installs_one_otherwise(tmp_path, monkeypatch) -> None:
    ctx = gc.Ctx(tmp_path)
    url = f"TORCH_INDEX_URL={gc.CUDA_INDEX_URL}"
    cases = [
        (("2.13.0+cu128", "12.8"), ".venv has torch 2.13.0+cu128 (CUDA 12.8): kept"),
        (("2.13.0+cpu", None), ["make", "-B", "setup", url]),  # the stamp would stop make
        (None, ["make", "setup", url]),
    ]
    for torch, expected in cases:
        monkeypatch.setattr(gc, "_venv_torch", lambda torch=torch: torch)
        assert gc._setup_command(ctx) == expected
    assert gc._setup_command(gc.Ctx(tmp_path, setup=False)) == "--no-setup"
    monkeypatch.setattr(gc, "_venv_torch", lambda: ("2.13.0+cpu", None))
    assert gc._setup_command(gc.Ctx(tmp_path, dry_run=True)) == (
        ".venv has torch 2.13.0+cpu: kept (dry run)"
    )
    # make ran but the torch is still CPU-only: failed, and the run goes on.
    outcome = gc.Outcome("setup", "", "ok")
    gc._setup_summary(ctx, outcome)
    assert outcome.status == "failed"
    assert outcome.note == (
        "after make setup, .venv's torch is 2.13.0+cpu; going on with what is installed"
    )


def test_pytest_step_reports_failed_tests_and_a_run_where_none_passed(tmp_path: Path) -> None:
    ctx = gc.Ctx(tmp_path)
    xml = tmp_path / "results" / "pytest_gpu.xml"
    xml.parent.mkdir()
    case = '<testcase classname="tests.test_precision" name="{}">{}</testcase>'
    cases = [
        case.format("test_ok", ""),
        case.format("test_bad", '<failure message="AssertionError: loss is nan">tb</failure>'),
        case.format("test_opt", '<skipped message="could not import bitsandbytes"/>'),
    ]
    xml.write_text(f"<testsuites><testsuite>{''.join(cases)}</testsuite></testsuites>")
    outcome = gc.Outcome("pytest_gpu", "", "failed", note="1 failed")
    gc._pytest_summary(ctx, outcome)
    assert outcome.status == "failed"
    assert outcome.note == "1 failed: test_precision::test_bad: AssertionError: loss is nan"
    assert (outcome.detail["passed"], outcome.detail["skipped"]) == (1, 1)
    xml.write_text(f"<testsuites><testsuite>{cases[2]}</testsuite></testsuites>")
    outcome = gc.Outcome("pytest_gpu", "", "ok")
    gc._pytest_summary(ctx, outcome)
    assert (outcome.status, outcome.note) == ("failed", "no GPU test passed (1 skipped)")


def test_steps_run_the_first_python_with_torch_and_pytest_only_gpu_modules(
    tmp_path: Path, monkeypatch
) -> None:
    assert gc._torch_of("/nonexistent/python") is None
    assert gc._torch_of(sys.executable)[0].startswith("2.")
    # The lent GPU machine: no .venv (or a broken one), its python3 holds torch.
    monkeypatch.setattr(gc, "_pythons", lambda: ["/repo/.venv/bin/python", "/opt/py3"])
    monkeypatch.setattr(
        gc, "_torch_of", lambda py: ("2.11.0", "13.0") if py == "/opt/py3" else None
    )
    ctx = gc.Ctx(tmp_path)
    assert ctx.python == "/opt/py3"
    step = next(s for s in gc.plan(ctx) if s.name == "pytest_gpu")
    command = step.command(ctx)
    assert command[:5] == ["/opt/py3", "-m", "pytest", "-m", "gpu"]
    files = [x for x in command if x.startswith("tests/")]
    assert {"tests/test_precision.py", "tests/test_lora.py"} <= set(files)
    assert "tests/test_gpu_check.py" not in files
    assert all(gc._GPU_MARK.search((ROOT / f).read_text()) for f in files)
