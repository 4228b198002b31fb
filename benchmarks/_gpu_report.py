"""The report of benchmarks/gpu_check.py: OUT/report.json and OUT/report.md, and the goals of
issue 33 judged against the benchmarks' numbers. Standard library only, as the driver.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpu_check import Ctx, Outcome

__all__ = ["EQUAL_LOSS", "LORA_SPEEDUP_GOAL", "MFU_GOAL", "goals", "write_report"]

MFU_GOAL = 0.50  # as gpu_throughput.MFU_GOAL (a test keeps them equal)
LORA_SPEEDUP_GOAL = 1.3
EQUAL_LOSS = 0.02


def _numbers(outcomes: list[Outcome]) -> dict[str, Any]:
    by = {o.name: o for o in outcomes}
    out = {}
    for part in ("gpt2", "lora"):
        o = by.get(f"bench_{part}")
        if o is not None and isinstance(o.detail.get(part), dict):
            out[part] = o.detail[part]
    return out


def goals(ctx: Ctx, outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """The issue's goals, each met / not met / not measured (dry run: not judged)."""
    numbers, by = _numbers(outcomes), {o.name: o for o in outcomes}

    def verdict(part: str, met: bool, why: str = "") -> str:
        if part not in numbers:
            o = by.get(f"bench_{part}")
            state = f"{o.status}: {o.note}" if o is not None and o.note else "not run"
            return f"not measured (bench_{part} {state})"
        if ctx.dry_run:
            return "not judged (dry run: tiny models on the CPU)"
        return "met" if met else f"not met{why}"

    rows = []
    g = numbers.get("gpt2", {})
    mfu, hf_mfu = g.get("kiln_mfu"), g.get("hf_mfu")
    rows.append(
        {
            "goal": f"GPT-2 124M: MFU >= {MFU_GOAL:.0%} (kiln, bf16, torch.compile)",
            "value": None if mfu is None else f"{mfu:.1%} (HF Trainer {hf_mfu:.1%})",
            "verdict": verdict("gpt2", mfu is not None and mfu >= MFU_GOAL),
        }
    )
    r = numbers.get("lora", {})
    speedup, apart = r.get("speedup"), r.get("loss_rel_diff")
    equal = apart is not None and apart <= EQUAL_LOSS
    rows.append(
        {
            "goal": f"LoRA r=16 on ~1.1B: kiln >= {LORA_SPEEDUP_GOAL}x HF Trainer + PEFT tokens/s "
            f"at equal loss (last-10-step means within {EQUAL_LOSS:.0%})",
            "value": None if speedup is None else f"{speedup:.2f}x, losses {apart:.2%} apart",
            "verdict": verdict(
                "lora",
                speedup is not None and speedup >= LORA_SPEEDUP_GOAL and equal,
                "" if equal or apart is None else f" (losses {apart:.1%} apart)",
            ),
        }
    )
    return rows


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


DRY_NOTE = "**Dry run**: tiny models on the CPU, CUDA hidden; the numbers mean nothing. "


def _markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# kiln GPU check",
        "",
        f"{DRY_NOTE if report['dry_run'] else ''}"
        f"Started {report['started_at']}, {report['wall_s']:.0f} s of a {report['budget_s']:g} s "
        f"budget{'' if report['complete'] else ' (still running)'}. "
        f"Steps: {report['counts']['ok']} ok, {report['counts']['failed']} failed, "
        f"{report['counts']['skipped']} skipped.",
        "",
        f"Device: **{env.get('device', '?')}**; torch {env.get('torch', '?')}, CUDA "
        f"{env.get('cuda') or 'none'}, cuDNN {env.get('cudnn') or 'none'}, NCCL "
        f"{env.get('nccl') or 'none'}; transformers {env.get('transformers')}, peft "
        f"{env.get('peft')}, bitsandbytes {env.get('bitsandbytes')}, flash-attn "
        f"{env.get('flash_attn')}, triton {env.get('triton')}.",
        "",
        "## Goals",
        "",
        "| goal | value | verdict |",
        "|---|---|---|",
    ]
    for g in report["goals"]:
        lines.append(f"| {_cell(g['goal'])} | {_cell(g['value'] or '-')} | {_cell(g['verdict'])} |")
    lines += ["", "## Steps", "", "| step | status | s | what | error / reason |"]
    lines.append("|---|---|---|---|---|")
    for s in report["steps"]:
        lines.append(
            f"| {s['name']} | {s['status']} | {s['duration_s']:.1f} | {_cell(s['what'])} "
            f"| {_cell(s['note'])} |"
        )
    titles = {"gpt2": "GPT-2 124M: kiln vs HF Trainer", "lora": "LoRA r=16: kiln vs HF + PEFT"}
    rows = [
        ("tokens/s", "tokens_per_s"),
        ("MFU", "mfu"),
        ("peak memory, MiB", "peak_mem_mb"),
        ("loss, mean of the last 10 steps", "loss_last10"),
    ]
    for part, numbers in report["numbers"].items():
        lines += ["", f"## {titles[part]}", "", "| | kiln | HF |", "|---|---|---|"]
        for label, key in rows:
            if f"kiln_{key}" in numbers:
                k, h = numbers[f"kiln_{key}"], numbers[f"hf_{key}"]
                fmt = (lambda x: f"{x:.2%}") if key == "mfu" else _fmt
                lines.append(f"| {label} | {fmt(k)} | {fmt(h)} |")
        shape = f"seq {numbers['seq_len']}, batch {numbers['batch']}"
        if "params" in numbers:
            shape += f", {numbers['params'] / 1e6:.1f}M parameters"
            shape += f", MFU against {numbers['peak_tflops']:g} TFLOP/s"
        lines += ["", f"kiln / HF: {numbers['speedup']:.2f}x tokens/s; {shape}."]
    details = [s for s in report["steps"] if s["detail"] and not s["name"].startswith("bench_")]
    if details:
        lines += ["", "## Details", ""]
        for s in details:
            flat = {k: v for k, v in s["detail"].items() if not isinstance(v, (dict, list)) or v}
            text = ", ".join(f"{k}={_fmt(v)}" for k, v in flat.items())
            lines.append(f"- **{s['name']}**: {text}")
    lines += ["", f"Logs: `{report['out']}/logs/STEP.stdout`, `.stderr`.", ""]
    return "\n".join(lines)


def write_report(ctx: Ctx, outcomes: list[Outcome], *, started_at: str, complete: bool) -> dict:
    """Write OUT/report.json and OUT/report.md; return the report."""
    counts = {k: sum(o.status == k for o in outcomes) for k in ("ok", "failed", "skipped")}
    report = {
        "started_at": started_at,
        "complete": complete,
        "dry_run": ctx.dry_run,
        "budget_s": ctx.budget_s,
        "wall_s": round(time.monotonic() - ctx.started, 1),
        "out": str(ctx.out),
        "environment": ctx.env,
        "counts": counts,
        "goals": goals(ctx, outcomes),
        "numbers": _numbers(outcomes),
        "steps": [o.__dict__ for o in outcomes],
    }
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (ctx.out / "report.md").write_text(_markdown(report))
    return report
