"""GPU readiness: every CUDA path of kiln and the GPU benchmarks, in one command, one report.

    bash benchmarks/gpu_check.sh                        # set up, then every step (< 10 min, H100)
    bash benchmarks/gpu_check.sh --no-setup             # .venv as it is (a lent GPU is offline)
    bash benchmarks/gpu_check.sh --dry-run --no-setup   # the same steps, tiny, on the CPU
    bash benchmarks/gpu_check.sh --only bench_gpt2,bench_lora --out runs/gpu_check_bench

Each step is a subprocess with its own timeout, killed with its process group when it runs
over, so one hang costs that step and not the run; steps start only while `--budget-s` (540 s)
has room for them. The steps, in order:

    setup              make setup TORCH_INDEX_URL=<cu128> (skipped when .venv has a CUDA torch)
    env                versions, device, CUDA / NCCL / cuDNN; fails without CUDA (not dry)
    smoke_bf16         kiln: a tiny GPT-2 trains under bf16 autocast, weights stay fp32
    smoke_fp16         kiln: fp16 autocast with the GradScaler (CUDA only)
    smoke_fused_adamw  kiln picks fused AdamW; fused == unfused AdamW on the device
    smoke_compile      kiln train.compile: same losses as eager; graphs and graph breaks
    smoke_flash        SDPA's flash backend alone: raw, an HF GPT-2, kiln's training step;
                       attn_implementation=flash_attention_2 when flash-attn is installed
    smoke_qlora        kiln QLoRA, 4-bit base via bitsandbytes (CUDA; skipped without it)
    smoke_memory       kiln.memory_stats and the CUDA allocator's counters; peak_mem_mb logged
    ddp_probe          torchrun, 1 rank: init_process_group (nccl), all_reduce, a DDP step
    kiln_ddp           torchrun, 1 rank: `kiln train` with train.distributed.strategy=ddp
                       (at world size 1 kiln starts no process group: ddp_probe checks NCCL)
    bench_gpt2         gpu_throughput.py --part gpt2: GPT-2 124M, kiln vs HF Trainer, MFU
    bench_lora         gpu_throughput.py --part lora: LoRA r=16 ~1.1B, kiln vs HF + PEFT
    pytest_gpu         pytest -m gpu: every CUDA-only test (CUDA only; last: if the budget ran
                       out before it, rerun it with --only pytest_gpu)

`--dry-run` runs them on the CPU with tiny sizes (CUDA hidden, one thread per process, gloo
for nccl, the benchmarks' own --dry-run, compile through the aot_eager backend: inductor's CPU
codegen alone takes ~50 s); the CUDA-only steps are reported as skipped (no CUDA).

The goals reported against (issue 33): GPT-2 124M MFU >= 50% (kiln, bf16, compile); LoRA r=16
on ~1.1B >= 1.3x HF Trainer + PEFT tokens/s at equal loss. A dry run does not judge them.

Writes OUT/report.json and OUT/report.md (rewritten after every step), and each step's output
to OUT/logs/STEP.stdout and .stderr. Exit code: 0 when no step failed, 1 when one did, 2 for
bad arguments. This file imports only the standard library: it runs before setup; the probes
the steps run (`_gpu_probes.py NAME`, one per process) import torch and kiln; the report and
the goals are `_gpu_report.py` (standard library only too).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its report, beside it (stdlib only)
from _gpu_report import (  # the goals and their thresholds, read here by the tests too
    EQUAL_LOSS,
    LORA_SPEEDUP_GOAL,
    MFU_GOAL,
    goals,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
CUDA_INDEX_URL = "https://download.pytorch.org/whl/cu128"
SKIP_EXIT = 77  # a probe that cannot apply here (as automake's tests): skipped, with its reason

__all__ = [
    "EQUAL_LOSS",
    "LORA_SPEEDUP_GOAL",
    "MFU_GOAL",
    "Ctx",
    "Outcome",
    "Step",
    "error_line",
    "goals",
    "main",
    "plan",
    "run_steps",
    "write_report",
]


# --- the driver (standard library only) -----------------------------------------------------


@dataclass
class Ctx:
    """What the steps of one run share."""

    out: Path
    dry_run: bool = False
    setup: bool = True
    index_url: str = CUDA_INDEX_URL
    budget_s: float = 540.0
    peak_tflops: float | None = None
    selected: set[str] | None = None
    """Steps to run (None: all); the others are skipped as not selected. env always runs."""
    cuda: bool = False
    """Whether the env step saw CUDA (never in a dry run)."""
    env: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    chosen_python: str | None = None

    @property
    def python(self) -> str:
        """The interpreter the steps run: the first of .venv's, this one and python3 that has
        torch (the lent GPU machine has no .venv; its python3 holds torch); chosen once, and
        again after setup."""
        if self.chosen_python is None:
            found = (str(p) for p in _pythons() if p and _torch_of(str(p)) is not None)
            self.chosen_python = next(found, sys.executable)
        return self.chosen_python

    def result(self, name: str) -> Path:
        return self.out / "results" / f"{name}.json"

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


@dataclass
class Step:
    """One path to check. `command` gives the argv to run, or a string: the reason to skip."""

    name: str
    what: str
    command: Callable[[Ctx], list[str] | str]
    timeout_s: float
    min_s: float = 20.0
    """Not started with less of the budget left than this."""
    needs_cuda: bool = False
    summarize: Callable[[Ctx, Outcome], None] | None = None
    """Reads what the step left (beyond `result(name)`) into its outcome."""
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    name: str
    what: str
    status: str  # ok | failed | skipped
    duration_s: float = 0.0
    note: str = ""
    """failed: the error line; skipped: the reason."""
    needs_cuda: bool = False
    detail: dict[str, Any] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)


_EXCEPTION = re.compile(r"\b\w*(Error|Exception|Interrupt)\b:|^[A-Z]\w+Error$")
_ERRORISH = re.compile(r"error:|FAILED|Killed|Aborted|No module named|not available|timed out")
_NOISE = re.compile(
    r"^(\s*\^+\s*$|\s*~+\s*$|Traceback \(most recent call last\)|\s*File \"|\s*warnings\.warn"
    r"|\[W\d{4}|.*\bWarning\b:|.*UserWarning|.*FutureWarning|\s*$"
    r"|.*ChildFailedError)"  # torchrun's wrapper: the rank's own error came before it
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_line(stderr: str, stdout: str = "") -> str:
    """The line that says what went wrong: the last exception line of stderr (then stdout),
    else its last error-like line, else its last line that is not noise (separators,
    warnings, traceback frames)."""
    for text in (stderr, stdout):
        lines = []
        for raw in _ANSI.sub("", text).splitlines():
            line = re.sub(r"^\[rank\d+\]:\s?", "", raw).rstrip()
            if not _NOISE.match(line) and re.search(r"[A-Za-z0-9]", line):
                lines.append(line.strip())
        for pattern in (_EXCEPTION, _ERRORISH):
            hits = [x for x in lines if pattern.search(x)]
            if hits:
                return hits[-1][:400]
        if lines:
            return lines[-1][:400]
    return ""


def _tail(path: Path, limit: int = 200_000) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read().decode("utf-8", "replace")


def _environ(ctx: Ctx, step: Step) -> dict[str, str]:
    env = {**os.environ, **step.env, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    # kiln from this checkout, installed or not (the lent machine's python3 has no kiln).
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH")) if x)
    env["TRANSFORMERS_OFFLINE"] = "1"  # no hub: every model is built from a config
    if ctx.dry_run:  # no CUDA, one thread per process: the box is shared
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    return env


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the step's process group (it started one), then SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, ctx: Ctx) -> Outcome:
    """Run one step (or say why not) and judge it: exit 0 ok, SKIP_EXIT skipped, else failed."""
    outcome = Outcome(step.name, step.what, "skipped", needs_cuda=step.needs_cuda)
    if ctx.selected is not None and step.name not in ctx.selected and step.name != "env":
        outcome.note = "not selected (--only / --skip)"
        return outcome
    if step.needs_cuda and not ctx.cuda:
        outcome.note = "no CUDA"
        return outcome
    left = ctx.left_s()
    if left < step.min_s:
        outcome.note = f"budget: {max(left, 0):.0f} s left of --budget-s {ctx.budget_s:g}"
        return outcome
    command = step.command(ctx)
    if isinstance(command, str):
        outcome.note = command
        return outcome
    logs = ctx.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ctx.result(step.name).parent.mkdir(parents=True, exist_ok=True)
    out_log, err_log = logs / f"{step.name}.stdout", logs / f"{step.name}.stderr"
    ctx.result(step.name).unlink(missing_ok=True)
    timeout = min(step.timeout_s, left)
    start = time.monotonic()
    with out_log.open("wb") as out, err_log.open("wb") as err:
        try:
            proc = subprocess.Popen(
                command, cwd=ROOT, env=_environ(ctx, step), stdout=out, stderr=err,
                start_new_session=True,
            )  # fmt: skip
        except OSError as exc:  # no such program (make, python)
            outcome.status, outcome.note = "failed", f"{command[0]}: {exc}"
            return outcome
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            code = None
    outcome.duration_s = round(time.monotonic() - start, 1)
    outcome.logs = [str(out_log.relative_to(ctx.out)), str(err_log.relative_to(ctx.out))]
    if ctx.result(step.name).exists():
        try:
            outcome.detail = json.loads(ctx.result(step.name).read_text())
        except json.JSONDecodeError as exc:
            outcome.detail = {"unreadable_result": str(exc)}
    said = error_line(_tail(err_log), _tail(out_log))
    if code is None:
        outcome.status = "failed"
        outcome.note = f"timed out after {timeout:.0f} s" + (f"; last: {said}" if said else "")
    elif code == 0:
        outcome.status = "ok"
    elif code == SKIP_EXIT:
        outcome.note = said or "skipped by the step"
    else:
        outcome.status = "failed"
        outcome.note = said or f"exit code {code}"
    if step.summarize is not None:
        step.summarize(ctx, outcome)
    return outcome


def run_steps(steps: list[Step], ctx: Ctx, on_step: Callable[[list[Outcome]], None]) -> list:
    """Run `steps` in order, calling `on_step` with the outcomes so far after each."""
    outcomes: list[Outcome] = []
    for step in steps:
        print(f"[gpu_check] {step.name}: {step.what}", flush=True)
        outcome = run_step(step, ctx)
        if step.name == "setup" and outcome.status != "skipped":
            ctx.chosen_python = None  # setup may have made .venv's python the one with torch
        if step.name == "env":
            ctx.env = outcome.detail
            ctx.cuda = bool(outcome.detail.get("cuda_available")) and not ctx.dry_run
        outcomes.append(outcome)
        note = f" ({outcome.note})" if outcome.note else ""
        print(f"[gpu_check]   {outcome.status} {outcome.duration_s:.1f} s{note}", flush=True)
        on_step(outcomes)
    return outcomes


# --- the steps --------------------------------------------------------------------------------


def _pythons() -> list[Path | str | None]:
    """Where to look for an interpreter with torch, in order."""
    return [ROOT / ".venv" / "bin" / "python", sys.executable, shutil.which("python3")]


def _torch_of(python: str) -> tuple[str, str | None] | None:
    """(torch version, its CUDA version or None) of `python`'s torch; None without one."""
    code = "import json, torch; print(json.dumps([torch.__version__, torch.version.cuda]))"
    try:
        done = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=120, check=True
        )
        version, cuda = json.loads(done.stdout.strip().splitlines()[-1])
        return version, cuda
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _venv_torch() -> tuple[str, str | None] | None:
    """.venv's torch (`_torch_of`), None without .venv or torch in it."""
    return _torch_of(str(ROOT / ".venv" / "bin" / "python"))


def _setup_command(ctx: Ctx) -> list[str] | str:
    if not ctx.setup:
        return "--no-setup"
    torch = _venv_torch()
    if ctx.dry_run:  # the CPU torch is what a dry run wants
        return f".venv has torch {torch[0]}: kept (dry run)" if torch else ["make", "setup"]
    if torch and torch[1]:
        return f".venv has torch {torch[0]} (CUDA {torch[1]}): kept"
    # A CPU torch under a fresh stamp: make would see nothing to do; -B reinstalls.
    return ["make", *(["-B"] if torch else []), "setup", f"TORCH_INDEX_URL={ctx.index_url}"]


def _setup_summary(ctx: Ctx, outcome: Outcome) -> None:
    torch = _venv_torch()
    outcome.detail["torch"] = torch[0] if torch else None
    if outcome.status == "ok" and not ctx.dry_run and not (torch and torch[1]):
        outcome.status = "failed"
        outcome.note = f"after make setup, .venv's torch is {torch[0] if torch else 'missing'}"
    if outcome.status == "failed":
        outcome.note += "; going on with what is installed"


def _pytest_summary(ctx: Ctx, outcome: Outcome) -> None:
    """Counts and failures from pytest's JUnit XML; a run where no GPU test passed fails."""
    import xml.etree.ElementTree as ET

    xml = ctx.out / "results" / "pytest_gpu.xml"
    if not xml.exists():
        return
    cases = ET.parse(xml).getroot().iter("testcase")
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures, skips = [], []
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}".rsplit(".", 1)[-1]
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            counts["failed"] += 1
            failures.append(f"{name}: {(bad.get('message') or '').splitlines()[0][:200]}")
        elif skipped is not None:
            counts["skipped"] += 1
            skips.append(f"{name}: {skipped.get('message', '')[:200]}")
        else:
            counts["passed"] += 1
    outcome.detail = {**counts, "failures": failures, "skips": skips}
    if failures:
        outcome.status = "failed"
        outcome.note = f"{counts['failed']} failed: " + "; ".join(failures[:3])
    elif outcome.status == "ok" and not counts["passed"]:
        outcome.status = "failed"
        outcome.note = f"no GPU test passed ({counts['skipped']} skipped)"


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]


def _tiny_gpt2(positions: int) -> dict[str, Any]:
    """kiln's model section of the 2 x 64 GPT-2 the smoke checks train."""
    return {"arch": "gpt2", "hidden_size": 64, "num_layers": 2, "num_heads": 2,
            "max_position_embeddings": positions}  # fmt: skip


def _kiln_ddp_command(ctx: Ctx) -> list[str]:
    """A tiny `kiln train` under torchrun at world size 1 (the config is written as JSON,
    which YAML reads)."""
    work = ctx.out / "work" / "kiln_ddp"
    work.mkdir(parents=True, exist_ok=True)
    train = {
        "max_steps": 6,
        "batch_size": 4,
        "device": "cpu" if ctx.dry_run else "cuda",
        "precision": "fp32" if ctx.dry_run else "bf16",
        "distributed": {"strategy": "ddp", "backend": "gloo" if ctx.dry_run else "nccl"},
    }
    data = {"train": str(ROOT / "examples" / "data" / "recipes_val.jsonl"), "max_length": 128}
    raw = {
        "name": "gpu-check-ddp",
        "output_dir": str(work / "run"),
        "model": _tiny_gpt2(128),
        "tokenizer": {"vocab_size": 320},
        "data": {**data, "cache_dir": str(work / "cache")},
        "optim": {"lr": 3e-3, "scheduler": "constant"},
        "train": train,
        "checkpoint": {"every_steps": None},
        "log": {"every_steps": 2, "progress": "none", "plots": False},
    }
    config = work / "config.yaml"
    config.write_text(json.dumps(raw, indent=2) + "\n")
    return [ctx.python, *TORCHRUN, "-m", "kiln", "-q", "train", str(config), "--overwrite"]


def _kiln_ddp_summary(ctx: Ctx, outcome: Outcome) -> None:
    summary = ctx.out / "work" / "kiln_ddp" / "run" / "summary.json"
    if summary.exists():
        keep = ("steps", "tokens", "tokens_per_s", "wall_time_s", "status")
        data = json.loads(summary.read_text())
        outcome.detail = {k: data[k] for k in keep if k in data}
    elif outcome.status == "ok":
        outcome.status, outcome.note = "failed", f"no {summary.relative_to(ctx.out)}"


_GPU_MARK = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\b.*\bmark\.gpu\b)", re.M)


def plan(ctx: Ctx) -> list[Step]:
    """Every step, in the order they run: the quick checks first, so a broken path shows
    before the benchmarks spend the budget; pytest last (`--only pytest_gpu` reruns it)."""
    dry = ["--dry-run"] if ctx.dry_run else []
    probes = str(HERE / "_gpu_probes.py")

    def probe(name: str, *, torchrun: bool = False) -> Callable[[Ctx], list[str]]:
        run = [*TORCHRUN, probes] if torchrun else [probes]
        return lambda c: [c.python, *run, name, "--result", str(c.result(name)), *dry]

    def bench(part: str) -> Callable[[Ctx], list[str]]:
        def command(c: Ctx) -> list[str]:
            peak = ["--peak-tflops", str(c.peak_tflops)] if c.peak_tflops else []
            args = ["--part", part, "--json", str(c.result(f"bench_{part}")), *peak, *dry]
            return [c.python, str(HERE / "gpu_throughput.py"), *args]

        return command

    def pytest(c: Ctx) -> list[str] | str:
        # Only the modules with GPU tests: a module that needs an extra the machine lacks
        # (the lent GPU's python3 has no fastapi) cannot stop the collection.
        files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").rglob("test_*.py")
                       if _GPU_MARK.search(f.read_text(errors="replace")))  # fmt: skip
        if not files:
            return "no test is marked gpu"
        xml = c.out / "results" / "pytest_gpu.xml"
        pytest = ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
        return [c.python, *pytest, f"--junitxml={xml}", *files]

    nccl = "gloo" if ctx.dry_run else "nccl"
    offline_pip = {"PIP_RETRIES": "1", "PIP_TIMEOUT": "30"}  # offline: fail in seconds
    cuda = {"needs_cuda": True}
    smoke = {
        "smoke_bf16": ("kiln trains under bf16 autocast; weights stay fp32", 120, {}),
        "smoke_fp16": ("kiln trains under fp16 with the GradScaler", 120, cuda),
        "smoke_fused_adamw": ("kiln's AdamW is fused; fused == unfused on the device", 120, {}),
        "smoke_compile": ("kiln train.compile: losses as eager; graphs, breaks", 240, {}),
        "smoke_flash": ("SDPA flash backend alone: raw, HF GPT-2, kiln's step", 150, {}),
        "smoke_qlora": ("kiln QLoRA: 4-bit base (bitsandbytes), LoRA trains", 150, cuda),
        "smoke_memory": ("kiln.memory_stats, CUDA allocator stats, peak_mem_mb", 120, {}),
    }
    return [
        Step("setup", f"make setup TORCH_INDEX_URL={ctx.index_url}", _setup_command, 300,
             min_s=60, summarize=_setup_summary, env=offline_pip),
        Step("env", "versions, device, CUDA, NCCL, cuDNN", probe("env"), 90, min_s=5),
        *(Step(name, what, probe(name), t, **kw) for name, (what, t, kw) in smoke.items()),
        Step("ddp_probe", f"torchrun, 1 rank: {nccl} process group, all_reduce, a DDP step",
             probe("ddp_probe", torchrun=True), 150),
        Step("kiln_ddp", f"torchrun, 1 rank: kiln train, strategy ddp, backend {nccl}",
             _kiln_ddp_command, 180, summarize=_kiln_ddp_summary),
        Step("bench_gpt2", "gpu_throughput --part gpt2: GPT-2 124M, kiln vs HF Trainer",
             bench("gpt2"), 270, min_s=120),
        Step("bench_lora", "gpu_throughput --part lora: LoRA r=16 ~1.1B, kiln vs HF + PEFT",
             bench("lora"), 300, min_s=150),
        Step("pytest_gpu", "pytest -m gpu: every CUDA-only test", pytest, 300, min_s=60,
             summarize=_pytest_summary, **cuda),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="gpu_check.sh",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:6]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, CUDA hidden")
    p.add_argument("--no-setup", dest="setup", action="store_false", help="skip make setup")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check", help="report folder")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget (540)")
    p.add_argument("--only", default="", help="comma-separated steps to run (env always runs)")
    p.add_argument("--skip", default="", help="comma-separated steps not to run")
    p.add_argument("--torch-index-url", default=CUDA_INDEX_URL, help="for make setup")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default 989)")
    args = p.parse_args(argv)
    ctx = Ctx(
        args.out.resolve(),
        args.dry_run,
        args.setup,
        args.torch_index_url,
        args.budget_s,
        args.peak_tflops,
    )
    steps = plan(ctx)
    names = [s.name for s in steps]
    only, skip = ({x.strip() for x in v.split(",") if x.strip()} for v in (args.only, args.skip))
    unknown = sorted((only | skip) - set(names))
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}; the steps: {', '.join(names)}")
    if only or skip:
        ctx.selected = (only or set(names)) - skip
    started_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    def progress(so_far: list[Outcome]) -> None:
        write_report(ctx, so_far, started_at=started_at, complete=False)

    outcomes = run_steps(steps, ctx, progress)
    report = write_report(ctx, outcomes, started_at=started_at, complete=True)
    for g in report["goals"]:
        print(f"[gpu_check] goal: {g['goal']}: {g['value'] or '-'}: {g['verdict']}")
    counts = report["counts"]
    print(
        f"[gpu_check] {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} "
        f"skipped in {report['wall_s']:.0f} s; report: {ctx.out / 'report.md'}"
    )
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
