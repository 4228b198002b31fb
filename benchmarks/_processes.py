"""`step_overhead.py --processes`: what a whole `kiln train` process costs per step against
the raw loop run as a process of its own (see step_overhead.py's docstring)."""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["print_processes", "processes"]

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
QUIET = (  # the per-step work only: what validation or a checkpoint costs is not overhead
    "eval.every_steps=null",
    "eval.generate.num_samples=0",
    "eval.sample_prompt=null",
    "checkpoint.every_steps=null",
    "log.progress=none",
)


def process_seconds(cmd: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one whole process (CPU: user + system of it and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {done.returncode}:\n{done.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def processes(args: argparse.Namespace, *, script: Path) -> dict[str, Any]:
    """Interleaved rounds of kiln and raw processes of --short and --long steps (the raw side:
    `script --raw-process N`)."""
    kiln_bin = str(Path(sys.executable).with_name("kiln"))
    per_step: dict[str, list[tuple[float, float]]] = {"raw": [], "kiln": []}
    with tempfile.TemporaryDirectory(prefix="kiln-steps-") as tmp:

        def command(name: str, steps: int) -> list[str]:
            if name == "raw":
                size = ["--quickstart"] if args.quickstart else []
                return [sys.executable, str(script), *size, f"--threads={args.threads}",
                        f"--raw-process={steps}"]  # fmt: skip
            out = Path(tmp) / f"kiln-{steps}"
            return [kiln_bin, "train", str(QUICKSTART), *QUIET, f"train.max_steps={steps}",
                    f"train.num_threads={args.threads}", f"output_dir={out}",
                    f"data.cache_dir={Path(tmp) / 'cache'}", "--overwrite"]  # fmt: skip

        process_seconds(command("kiln", 2))  # fills the token cache: not timed
        for r in range(args.rounds):
            order = ("kiln", "raw") if r % 2 == 0 else ("raw", "kiln")
            took = {(n, k): process_seconds(command(n, k)) for k in (args.short, args.long)
                    for n in order}  # fmt: skip
            for name in order:
                (ws, cs), (wl, cl) = took[(name, args.short)], took[(name, args.long)]
                n = args.long - args.short
                per_step[name].append((1e3 * (wl - ws) / n, 1e3 * (cl - cs) / n))
            print(
                f"  round {r + 1}/{args.rounds}: kiln {per_step['kiln'][-1][0]:.1f} ms, "
                f"raw {per_step['raw'][-1][0]:.1f} ms a step (wall)",
                flush=True,
            )
    wall = [k[0] / r[0] for k, r in zip(per_step["kiln"], per_step["raw"], strict=True)]
    cpu = [k[1] / r[1] for k, r in zip(per_step["kiln"], per_step["raw"], strict=True)]
    return {
        "mode": "processes",
        "config": {k: getattr(args, k) for k in ("rounds", "short", "long", "threads")},
        "step_ms": per_step,
        "wall_ratios": wall,
        "cpu_ratios": cpu,
        "kiln_over_raw": statistics.median(wall),
        "kiln_over_raw_cpu": statistics.median(cpu),
    }


def print_processes(report: dict[str, Any]) -> None:
    cfg = report["config"]
    print(
        f"\nwhole processes, quickstart ({cfg['long']} - {cfg['short']} steps), "
        f"{cfg['threads']} threads, {cfg['rounds']} rounds"
    )
    for name in ("raw", "kiln"):
        wall = statistics.median(w for w, _ in report["step_ms"][name])
        cpu = statistics.median(c for _, c in report["step_ms"][name])
        print(f"{name:<6} {wall:8.1f} ms wall {cpu:8.1f} ms CPU a step (medians)")
    for key, what in (("wall_ratios", "wall"), ("cpu_ratios", "CPU")):
        ratios = report[key]
        print(
            f"kiln/raw ({what}) = {statistics.median(ratios):.3f}   "
            f"(per-round {min(ratios):.3f} .. {max(ratios):.3f})"
        )
