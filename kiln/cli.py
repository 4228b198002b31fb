"""The `kiln` command line: train, data preview, config validate, config explain.

Exit codes: 0 done; 2 bad input (config, data, arguments, files: one line per problem on
stderr, never a traceback); 3 stopped by SIGTERM/SIGINT after writing a checkpoint (continue
with `--resume`); 130 aborted by a second Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from kiln.config import load_config
from kiln.errors import KilnError

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # a second Ctrl-C: aborted at once (checkpoints already written stay)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(EXIT_USAGE, f"kiln: error: {message}\n")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-3"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = _Parser(
        prog="kiln",
        description="kiln: train transformer language models from one YAML file.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p_train = sub.add_parser("train", help="train a model described by a config")
    _add_config_args(p_train)
    p_train.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run in the same output_dir"
    )
    p_train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from the newest complete checkpoint of the run, or from CHECKPOINT",
    )

    p_data = sub.add_parser("data", help="inspect the data a config trains on")
    data_sub = p_data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    p_prev = data_sub.add_parser(
        "preview", help="counts kept/dropped, token lengths, rendered samples with loss masks"
    )
    _add_config_args(p_prev)
    p_prev.add_argument("--samples", type=int, default=3, help="rendered samples to show")

    p_cfg = sub.add_parser("config", help="check or explain a config")
    cfg_sub = p_cfg.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    _add_config_args(cfg_sub.add_parser("validate", help="validate a config (exit 2 if bad)"))
    _add_config_args(
        cfg_sub.add_parser("explain", help="resolved config, batch and token counts, LR schedule")
    )
    return parser


def _train(args: argparse.Namespace) -> int:
    from kiln.engine import Trainer
    from kiln.engine.signals import EXIT_STOPPED

    cfg = load_config(args.config, args.overrides)
    result = Trainer.from_config(cfg, overwrite=args.overwrite, resume=args.resume).fit()
    s = result.summary
    if result.final_dir is None:  # paused by SIGTERM/SIGINT after writing a checkpoint
        where = result.checkpoint_paths[-1] if result.checkpoint_paths else result.run_dir
        print(f"\nstopped at step {s['steps']} ({s['stop_reason']}); checkpoint: {where}")
        print(f"continue with: kiln train {args.config} --resume")
        return EXIT_STOPPED
    val = s["final_val"]
    print(f"\nrun directory: {result.run_dir}")
    print(
        f"steps {s['steps']}  tokens {s['tokens']:,}  {s['wall_time_s']:.1f}s  "
        f"{s['tokens_per_s']:,.0f} tok/s"
    )
    if val:
        first = result.metrics[0]
        print(
            f"val_loss {first['val_loss']:.4f} (step {first['step']}) -> "
            f"{val['val_loss']:.4f} (step {s['steps']}), perplexity {val['val_ppl']:.2f}"
        )
    print(f"final model: {result.final_dir}")
    if result.sample is not None:
        print("\n--- sample ---\n" + result.sample + "\n--------------")
    return 0


def _config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.config_command == "validate":
        print(f"{args.config}: ok")
        return 0
    from kiln.explain import explain

    print(explain(cfg))
    return 0


def _data(args: argparse.Namespace) -> int:
    from kiln.data.preview import preview

    cfg = load_config(args.config, args.overrides)
    print(preview(cfg, samples=args.samples))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kiln` console script; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow options (`kiln train c.yaml --overwrite a.b=1`).
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="kiln: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "huggingface_hub", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.command in ("train", "data"):
        from transformers.utils import logging as hf_logging

        # kiln draws its own progress and reports lengths itself (e.g. the warning that a
        # document is longer than model_max_length is expected before packing).
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "data":
            return _data(args)
        return _config(args)
    except KilnError as exc:
        for line in str(exc).splitlines():
            print(f"kiln: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
