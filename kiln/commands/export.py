"""`kiln export RUN_DIR|CKPT --format onnx[,torchscript,pt2] [--out DIR]`: the model exported
and checked against PyTorch; `kiln export --verify DIR`: the checks again (docs/export.md).

An export that is out of tolerance exits 1 with one line naming the format and the case,
keeps its report at `<out>.export_report.json` and writes no output directory. `--verify`
prints one line per check (`--json`: the whole report); a damaged export directory is one
line per damaged file, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from kiln.commands import MODEL_PATH, add_flag, add_path
from kiln.runs import ExitCode

HELP = "export a model to ONNX, TorchScript or torch.export, gated by parity with PyTorch"
QUIET_HF = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_path(p, "path", "RUN_DIR|CKPT|DIR", f"{MODEL_PATH}; with --verify, an export directory")
    p.add_argument(
        "--format",
        default="onnx",
        metavar="F[,F]",
        help="onnx, torchscript, pt2, or several comma-separated (onnx)",
    )
    p.add_argument("--out", metavar="DIR", help="the export directory (<run>/export)")
    p.add_argument("--opset", type=int, default=18, metavar="N", help="ONNX opset (18)")
    p.add_argument(
        "--atol",
        type=float,
        default=None,
        metavar="X",
        help="max abs logit difference (1e-4; --verify: the export's)",
    )
    p.add_argument(
        "--check-data",
        metavar="FILE",
        help="prompts for the greedy check: a text file (a prompt a line) or JSONL "
        "(prompt, source or text); default the run's validation data",
    )
    p.add_argument("--prompts", type=int, default=4, metavar="N", help="greedy prompts (4)")
    add_flag(p, "--verify", "re-run the parity checks of an export directory")
    add_flag(p, "--json", "with --verify: print the whole report as JSON (not a line a check)")
    add_flag(p, "--overwrite", "replace --out if it exists (once the new export passed)")


def run(args: argparse.Namespace) -> int:
    from kiln.errors import KilnError
    from kiln.export import ParityFailed, export_model, verify_export
    from kiln.export.verify import report_json, summary_lines

    if args.json and not args.verify:
        raise KilnError("--json: only with --verify (an export writes export_report.json)")
    if args.verify:
        report = verify_export(args.path, args.atol)
        print(report_json(report) if args.json else "\n".join(summary_lines(report)))
        if not report["passed"]:
            bad = [f for f, e in report["formats"].items() if not e["passed"]]
            print(f"kiln: error: {args.path}: parity fails for {', '.join(bad)}", file=sys.stderr)
            return ExitCode.FAILED
        return ExitCode.FINISHED
    if args.prompts < 1:
        raise KilnError(f"--prompts: at least 1, got {args.prompts}")
    try:
        out = export_model(
            args.path,
            [f.strip() for f in args.format.split(",") if f.strip()],
            args.out,
            opset=args.opset,
            atol=1e-4 if args.atol is None else args.atol,
            check_data=args.check_data,
            prompts=args.prompts,
            overwrite=args.overwrite,
        )
    except ParityFailed as exc:
        print(f"kiln: error: export failed parity: {exc}; report: {exc.report}", file=sys.stderr)
        return ExitCode.FAILED
    report = json.loads((out / "export_report.json").read_text())
    for fmt, entry in report["formats"].items():
        worst = max(c["max_abs"] for c in entry["cases"])
        attn = entry["attn_implementation"]
        extra = " (eager fallback)" if "fallback_from" in entry else ""
        extra += f", opset {entry['opset']}" if "opset" in entry else ""
        print(
            f"{fmt}: {entry['file']}, {entry['bytes'] / 2**20:.1f} MiB, exported in "
            f"{entry['export_s']:.1f}s, attention {attn}{extra}, max abs diff {worst:.2g}, "
            f"greedy {entry['greedy']['equal']}/{entry['greedy']['prompts']}"
        )
    print(f"export: {out}")
    return ExitCode.FINISHED
