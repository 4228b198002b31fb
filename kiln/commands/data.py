"""`kiln data preview CONFIG`: counts kept/dropped, token lengths, rendered samples.
`kiln data prepare CONFIG`: stream the training files into token shards (data.cache_dir).
`kiln data show RUN_DIR --step N`: the training samples of a run's anomaly at step N."""

from __future__ import annotations

import argparse

from kiln.commands import add_config_args, add_flag, add_path
from kiln.config import load_config
from kiln.runs import ExitCode

HELP = "inspect the data a config trains on, or the samples of a run's anomalies"
QUIET_HF = True


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True, parser_class=type(p))
    prev = sub.add_parser(
        "preview", help="counts kept/dropped, token lengths, rendered samples with loss masks"
    )
    add_config_args(prev)
    prev.add_argument("--samples", type=int, default=3, help="rendered samples to show")

    prep = sub.add_parser(
        "prepare",
        help="stream the training files into token shards under data.cache_dir (once: a "
        "second run finds them; a killed run continues)",
    )
    add_config_args(prep)
    prep.add_argument(
        "--shard-tokens",
        type=_positive,
        default=None,
        metavar="N",
        help="tokens a shard holds at most: sets data.shard_tokens (default: 64M)",
    )

    show = sub.add_parser(
        "show",
        help="the samples of a run's anomaly (anomalies.jsonl): their source rows, or their "
        "decoded tokens for packed data",
    )
    add_path(show, "run_dir", "RUN_DIR", "a run directory (runs/<name>)")
    show.add_argument(
        "--step",
        type=_positive,
        metavar="N",
        help="the optimizer step of the anomaly (default: list the run's anomalies)",
    )
    show.add_argument(
        "--samples",
        type=_positive,
        metavar="K",
        help="show at most K samples per anomaly (default: all of the step's batch)",
    )
    show.add_argument(
        "--max-chars",
        type=_positive,
        default=400,
        metavar="C",
        help="cut each sample's content to C characters (default: 400)",
    )
    add_flag(
        show,
        "--decode",
        "also decode the samples' tokens from the rebuilt training data (what the model saw: "
        "truncated, templated) where their source rows are known",
    )


def run(args: argparse.Namespace) -> int:
    if args.data_command == "show":
        from kiln.anomalies import show_anomalies

        shown = show_anomalies(
            args.run_dir,
            args.step,
            max_chars=args.max_chars,
            max_samples=args.samples,
            decode=args.decode,
        )
        print(shown.text)
        return ExitCode.FINISHED

    if args.data_command == "prepare":
        from kiln.data.shards.prepare import prepare_shards

        overrides = list(args.overrides or [])
        if args.shard_tokens is not None:  # the same as the override (training looks for it)
            overrides.append(f"data.shard_tokens={args.shard_tokens}")
        cfg = load_config(args.config, overrides)
        if cfg.data.sources is not None:  # a mixture: one set per source
            from kiln.data.shards.mixture import prepare_sources

            for source, prepared in zip(cfg.data.sources, prepare_sources(cfg), strict=True):
                print(f"{source.label}: {prepared.summary()}")
            return ExitCode.FINISHED
        prepared = prepare_shards(cfg)
        print(prepared.summary())
        from kiln.data.shards.values import reads_rows

        if reads_rows(cfg):  # the curriculum's values of the rows, once, as training reads them
            from kiln.data.shards.reader import ShardSet
            from kiln.data.shards.values import document_values

            documents = len(ShardSet.open(prepared.directory, verify="index"))
            names = ", ".join(document_values(cfg, prepared.directory, documents))
            print(f"curriculum values ({names}) of {documents:,} documents: ready")
        return ExitCode.FINISHED

    from kiln.data.preview import preview

    cfg = load_config(args.config, args.overrides)
    if cfg.data.sources is not None:  # a mixture: each source as a config of its own
        from kiln.data.shards.mixture import source_config, source_error, weights_of

        shares = weights_of(cfg.data.sources)
        for k, (source, share) in enumerate(zip(cfg.data.sources, shares, strict=True)):
            print(f"== data.sources.{k}: {source.label} (weight {share:.3g}) ==")
            try:
                print(preview(source_config(cfg, k), samples=args.samples))
            except Exception as exc:
                raise source_error(exc, k) from None
        return ExitCode.FINISHED
    print(preview(cfg, samples=args.samples))
    return ExitCode.FINISHED
