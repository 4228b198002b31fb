"""`kiln eval RUN_DIR|CKPT --data FILE [key=value ...]`: loss, perplexity, accuracy and the
configured generation metrics of a trained model on any dataset.

The data is read, checked and filtered as the run's validation data was (its `data` section:
format, fields or templates, min_quality_score, dedup), tokenized the same way, and evaluated
in full (or `--max-batches`). Generation metrics follow the run's `eval.generate` (overrides
such as `eval.generate.num_samples=16` change them). The report goes to a JSON file (default
<run>/eval/<data name>.json, with the generated samples beside it) and is printed as a table.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kiln.commands import MODEL_PATH, add_overrides, add_path
from kiln.runs import ExitCode

HELP = "evaluate a run's model (loss, perplexity, generation metrics) on a dataset"
QUIET_HF = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_path(p, "path", "RUN_DIR|CKPT", MODEL_PATH)
    add_overrides(p, "overrides of the run's config")
    p.add_argument("--data", required=True, metavar="FILE", help="the dataset to evaluate on")
    p.add_argument("--out", metavar="FILE", help="report path (default <run>/eval/<data>.json)")
    p.add_argument("--max-batches", type=int, metavar="N", help="evaluate N batches at most")
    p.add_argument("--batch-size", type=int, metavar="N", help="batch size (the run's default)")
    p.add_argument(
        "--num-samples",
        type=int,
        metavar="N",
        help="generation eval on N rows (default: the run's eval.generate.num_samples; 0: off)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (auto)")


def _positive(value: int | None, flag: str) -> None:
    from kiln.errors import KilnError

    if value is not None and value < 1:
        raise KilnError(f"{flag}: must be >= 1, got {value}")


def _report_path(args: argparse.Namespace, model_dir: Path) -> Path:
    from kiln.runs import RunPaths, run_dir_of

    if args.out:
        return Path(args.out)
    # final/ -> the run; checkpoints/step-N -> the run; a model directory -> itself.
    run = RunPaths(run_dir_of(model_dir) or model_dir)
    return run.eval / f"{Path(args.data).stem}.json"


def _check_report_path(out: Path, data: str) -> None:
    """Refuse a report path that would overwrite the data being evaluated, or is a directory."""
    from kiln.errors import KilnError
    from kiln.files import resolve_path

    data_file = resolve_path(data, "--data")
    for path in (out, out.with_suffix(".samples.jsonl")):
        if resolve_path(path, "--out") == data_file:
            raise KilnError(f"--out: {path} is the --data file; the report would overwrite it")
    if out.is_dir():
        raise KilnError(f"--out: {out} is a directory; give a file name")


def evaluate_on(
    loaded: Any, data: str, *, overrides: list[str], max_batches: int | None, batch_size: int | None
) -> tuple[dict[str, Any], Any, list[Any]]:
    """(report, config, rows): loss metrics of `loaded` on `data` as the run validated."""
    from kiln.config import apply_overrides, config_from_dict
    from kiln.data import load_eval_data
    from kiln.data.collate import Batcher
    from kiln.device import Precision
    from kiln.errors import KilnError

    if loaded.cfg is None:
        raise KilnError(f"{loaded.path}: no kiln config (kiln_config.yaml); not a kiln run")
    raw = apply_overrides(loaded.cfg.model_dump(mode="json"), [*overrides, f"data.val={data}"])
    cfg = config_from_dict(raw, "overrides")
    tokenizer, model = loaded.tokenizer, loaded.model
    rows, dataset, stats = load_eval_data(cfg, tokenizer, data)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    precision = Precision(cfg.train.precision if device.type == "cuda" else "fp32", device)
    batcher = Batcher(
        cfg.task, pad, collator=cfg.data.collator, pad_to_multiple_of=cfg.data.pad_to_multiple_of
    )
    if cfg.task == "preference":  # the DPO loss and rewards against the run's reference
        objective = _preference_objective(cfg, model, tokenizer, precision)
        size = batch_size or cfg.eval.batch_size or cfg.train.batch_size
        metrics = objective.evaluate(
            model, dataset, batcher, batch_size=size, max_batches=max_batches
        )
    else:
        metrics = _token_metrics(cfg, model, dataset, batcher, precision, batch_size, max_batches)
    report = {
        "model": str(Path(loaded.path).resolve()),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": data,
        "rows": len(rows),
        "rows_dropped": dict(stats.dropped),
        "examples": len(dataset),
        "metrics": dict(metrics or {}),
    }
    return report, cfg, rows


def _token_metrics(
    cfg: Any,
    model: Any,
    dataset: Any,
    batcher: Any,
    precision: Any,
    batch_size: int | None,
    max_batches: int | None,
) -> dict[str, float] | None:
    from kiln.engine.evaluate import evaluate

    return evaluate(
        model,
        dataset,
        task=cfg.task,
        batch_size=batch_size or cfg.eval.batch_size or cfg.train.batch_size,
        pad_id=batcher.pad_id,
        precision=precision,
        max_batches=max_batches,
        batcher=batcher,
    )


def _preference_objective(cfg: Any, model: Any, tokenizer: Any, precision: Any) -> Any:
    """The run's DPO objective, its reference rebuilt as the run built it: LoRA's adapters
    off; else the base it started from (model.name_or_path) or its seeded initialization."""
    from kiln.engine.preference import DPO
    from kiln.process import seed_everything

    if hasattr(model, "disable_adapter"):
        return DPO(cfg.train.dpo, model, precision, adapters=True)
    from kiln.models import build_model

    seed_everything(cfg.seed)  # the initialization the run drew
    return DPO(cfg.train.dpo, build_model(cfg, tokenizer), precision)


def run(args: argparse.Namespace) -> int:
    from kiln.device import resolve_device
    from kiln.engine.generate_eval import GenerationEval
    from kiln.files import write_atomic
    from kiln.models.load import load_trained

    _positive(args.max_batches, "--max-batches")
    _positive(args.batch_size, "--batch-size")
    overrides = list(args.overrides)
    if args.num_samples is not None:
        overrides.append(f"eval.generate.num_samples={args.num_samples}")
    if args.out:  # before loading a model for minutes
        _check_report_path(Path(args.out), args.data)
    loaded = load_trained(args.path, device=resolve_device(args.device))
    out = _report_path(args, loaded.path)
    if not args.out:  # the default, <run>/eval/<data name>.json
        _check_report_path(out, args.data)
    report, cfg, rows = evaluate_on(
        loaded,
        args.data,
        overrides=overrides,
        max_batches=args.max_batches,
        batch_size=args.batch_size,
    )
    if cfg.eval.generate.num_samples:
        generated = GenerationEval(cfg).run(
            loaded.model,
            loaded.tokenizer,
            rows,
            samples_file=out.with_suffix(".samples.jsonl"),
        )
        report["metrics"].update(generated or {})
        report["samples"] = str(out.with_suffix(".samples.jsonl"))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(report, indent=2) + "\n")  # an earlier report stays whole
    print(f"{loaded.path} on {args.data}: {report['rows']} rows, {report['examples']} examples")
    width = max((len(k) for k in report["metrics"]), default=6)
    print(f"{'metric':<{width}}  value")
    for key, value in report["metrics"].items():
        print(f"{key:<{width}}  {value:.6g}")
    print(f"report: {out}")
    return ExitCode.FINISHED
