"""`kiln train CONFIG [key=value ...] [--overwrite] [--resume [RUN_DIR|CHECKPOINT]] [--nproc N]`.

`--nproc N` re-executes the command under `torch.distributed.run` (torchrun) with N ranks on
this machine; `--nnodes`, `--node-rank` and `--rdzv-endpoint` make it one node of several;
`--max-restarts K` lets torchrun restart the ranks when one fails (they resume with
`checkpoint.resume: auto`). `--nnodes MIN:MAX` is an elastic launch: nodes may leave and join,
the ranks restart at each membership change and resume at the new world size with the same
global batch (`kiln.engine.elastic`); a rendezvous short of MIN nodes pauses the run (exit 3).
`torchrun --nproc-per-node N -m kiln train CONFIG` is the same.
On N ranks, a collective that times out or a peer that dies makes every surviving rank print
where it was (`kiln.rank.CollectiveFailed`) and exit 1.

`kiln train --resume RUN_DIR [key=value ...]` continues a run from its own config.yaml (what
ran, overrides included), so the command printed when a run pauses needs nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from kiln.commands import add_config_args, add_flag
from kiln.config import RunConfig, load_config
from kiln.engine.signals import StoppedBeforeStart
from kiln.errors import KilnError
from kiln.preflight import preflight
from kiln.runs import CHECKPOINTS, MANIFEST, STEP_PREFIX, ExitCode, RunPaths, run_dir_of

HELP = "train a model described by a config"
QUIET_HF = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(
        p,
        "YAML run config (may be left out with --resume RUN_DIR: the run's own config)",
        optional=True,
    )
    add_flag(p, "--overwrite", "replace an earlier run in the same output_dir")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_DIR|CHECKPOINT",
        help="continue from the newest complete checkpoint of the run, of RUN_DIR, or from "
        "CHECKPOINT; without CONFIG the run's own config.yaml is used",
    )
    launch = p.add_argument_group("several processes (torchrun)")
    launch.add_argument("--nproc", type=int, metavar="N", help="ranks on this machine")
    launch.add_argument(
        "--nnodes",
        default="1",
        metavar="N|MIN:MAX",
        help="machines (1); MIN:MAX: elastic, nodes may leave and join (needs --rdzv-endpoint)",
    )
    launch.add_argument("--node-rank", type=int, default=0, metavar="K", help="this machine (0)")
    launch.add_argument(
        "--rdzv-endpoint", metavar="HOST:PORT", help="rendezvous of the nodes (c10d)"
    )
    launch.add_argument(
        "--rdzv-conf",
        metavar="K=V,...",
        help="torchrun's rendezvous settings, e.g. join_timeout=600,last_call_timeout=30",
    )
    launch.add_argument(
        "--max-restarts",
        type=int,
        default=None,
        metavar="K",
        help="restart the ranks up to K times when one fails (0; elastic: "
        f"{ELASTIC_RESTARTS}); with checkpoint.resume: auto they continue from the last "
        "complete checkpoint",
    )


ELASTIC_RESTARTS = 10
"""An elastic launch's default --max-restarts: each node lost costs the survivors one (a node
joining does not count)."""


def _nodes(text: str) -> tuple[int, int]:
    """`--nnodes N` or `MIN:MAX` as (min, max)."""
    low, _, high = text.partition(":")
    try:
        nodes = (int(low), int(high or low))
    except ValueError:
        raise KilnError(f"--nnodes: expected N or MIN:MAX, got {text!r}") from None
    if not 1 <= nodes[0] <= nodes[1]:
        raise KilnError(f"--nnodes: expected 1 <= MIN <= MAX, got {text!r}")
    return nodes


def _elastic(args: argparse.Namespace) -> bool:
    """`--nnodes MIN:MAX`: nodes may leave and join."""
    return ":" in str(args.nnodes)


def _launch(args: argparse.Namespace) -> list[str]:
    """The torchrun command that runs this `kiln train` on `--nproc` ranks."""
    high = _nodes(args.nnodes)[1]
    if args.nproc < 1:
        raise KilnError(f"--nproc: must be >= 1, got {args.nproc}")
    elastic = _elastic(args)
    restarts = args.max_restarts
    if restarts is None:
        restarts = ELASTIC_RESTARTS if elastic else 0
    if restarts < 0:
        raise KilnError(f"--max-restarts: must be >= 0, got {restarts}")
    # kiln.launcher: torchrun, leaving the ranks' lines to kiln (each once, no traceback).
    cmd = [sys.executable, "-m", "kiln.launcher", "--nproc-per-node", str(args.nproc)]
    if restarts:
        cmd += ["--max-restarts", str(restarts)]
    if high == 1 and not elastic and args.rdzv_endpoint is None:
        cmd.append("--standalone")  # a local rendezvous on a free port
    else:
        if args.rdzv_endpoint is None:
            raise KilnError(f"--nnodes {args.nnodes}: needs --rdzv-endpoint HOST:PORT")
        cmd += ["--nnodes", str(args.nnodes)]
        cmd += [] if elastic else ["--node-rank", str(args.node_rank)]
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint]
    if args.rdzv_conf:
        cmd += ["--rdzv-conf", args.rdzv_conf]
    cmd += ["-m", "kiln", *(["-q"] if args.quiet else []), "train"]
    cmd += [args.config] if args.config is not None else []
    cmd += list(args.overrides) + (["--overwrite"] if args.overwrite else [])
    if elastic:  # restarts resume, at the new world size with the same global batch
        cmd += ["checkpoint.resume=auto", "train.distributed.elastic.keep=global_batch"]
    if args.resume is True:
        cmd.append("--resume")
    elif args.resume is not None:
        cmd += ["--resume", str(args.resume)]
    return cmd


def _launch_env(args: argparse.Namespace) -> dict[str, str] | None:
    """torchrun's environment (None: this one). Restarted ranks must not find the addresses
    of the failed ones in torchrun's store, which outlives a restart: one machine's ranks
    prefix their keys by restart (`RankContext.setup`), but machines count restarts apart (a
    machine whose ranks did not fail restarts them without counting), so several machines
    take a fresh store per rendezvous round instead (pytorch/pytorch#135712)."""
    from kiln.launcher import ELASTIC_ENV

    if _elastic(args):  # membership changes restart the ranks without counting a restart
        return {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", ELASTIC_ENV: "1"}
    if _nodes(args.nnodes)[1] > 1 and (args.max_restarts or 0) > 0:
        return {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return None


def _run_launcher(cmd: list[str], run_dir: Path, env: dict[str, str] | None = None) -> int:
    """Run torchrun, passing SIGTERM/SIGINT/SIGUSR1 on to every rank. torchrun exits 1
    for any failed rank, and 0 for a pause under --max-restarts (see `run`), so the main rank's
    own exit code (paused 3, bad input 2, ...) is read back from status.json when the run
    wrote one, else from the ranks' closing lines, which are printed here, each once
    (`kiln.launcher`)."""
    import shutil
    import signal
    import subprocess
    import tempfile

    from kiln.engine.signals import StoppedBeforeStart
    from kiln.launcher import LINES_ENV, SIGNALLED, closing_lines
    from kiln.runs import read_status

    before = read_status(run_dir)
    received: list[int] = []
    proc: subprocess.Popen[bytes] | None = None

    def forward_to_ranks(signum: int, _: object) -> None:
        received.append(signum)
        with contextlib.suppress(OSError):  # the ranks tell the user's stop from the agent's
            (folder / SIGNALLED).touch()
        if proc is not None:
            _forward(proc.pid, signum)

    # SIGUSR1: a sweep pruning this trial (each rank then stops without a final model).
    prune = [signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else []
    signals = (signal.SIGTERM, signal.SIGINT, *prune)
    forward = {s: signal.signal(s, forward_to_ranks) for s in signals}
    folder = Path(tempfile.mkdtemp(prefix="kiln-ranks-"))
    try:
        if received:  # nothing started yet
            raise StoppedBeforeStart(received[-1])
        proc = subprocess.Popen(cmd, env={**(env or os.environ), LINES_ENV: str(folder)})
        if received:  # while torchrun was being started
            _forward(proc.pid, received[-1])
        code = proc.wait()
        lines, said = closing_lines(folder, signalled=bool(received))
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)
        shutil.rmtree(folder, ignore_errors=True)
    status = read_status(run_dir)
    own = status.get("exit_code") if status is not None and status != before else None
    if code == ExitCode.PAUSED:  # kiln.launcher: the rendezvous fell short of MIN nodes
        from kiln.engine.status import mark_paused

        lines = lines[:1]  # its line (the ranks' reports came before the restart)
        mark_paused(run_dir, lines[0] if lines else "the rendezvous timed out")
        own = ExitCode.PAUSED
    elif own == ExitCode.FINISHED and status is not None and status["state"] == "finished":
        return ExitCode.FINISHED  # after restarts: the earlier attempts' lines are in train.log
    for line in lines:
        print(line, file=sys.stderr)
    if own:
        return int(own)
    if said is None and code and received and received[-1] in (signal.SIGTERM, signal.SIGINT):
        raise StoppedBeforeStart(received[-1])  # before any rank could say it
    return said if said is not None else code


def _forward(launcher: int, signum: int) -> None:
    """`signum` to the ranks themselves: torchrun would give them 30 s to checkpoint, then
    SIGKILL (to torchrun itself while it has no ranks yet)."""
    for pid in _children(launcher) or [launcher]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc; [] elsewhere)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _resumed_run(path: Path) -> Path | None:
    """The run `--resume path` continues: `kiln.runs.run_dir_of`'s run, when `path` is that run
    with its config.yaml and checkpoints/, or one of its checkpoints (with its manifest; not
    final/, which holds no training state). None: neither."""
    run = run_dir_of(path)
    if run is None:
        return None
    paths = RunPaths(run)
    if run == path:
        return run if paths.config.is_file() and paths.checkpoints.is_dir() else None
    return run if path.parent.name == CHECKPOINTS and (path / MANIFEST).is_file() else None


def _load(args: argparse.Namespace) -> tuple[RunConfig, str | bool | None]:
    """The config and the resume target, from CONFIG or from the run being resumed."""
    overrides = list(args.overrides)
    config, resume = args.config, args.resume
    if config is not None and "=" in config and not Path(config).is_file():
        overrides.insert(0, config)  # `kiln train --resume RUN_DIR key=value`
        config = None
    if config is not None and Path(config).is_dir():
        if resume not in (None, True):
            raise KilnError(f"{config}: a directory; give a config file, or --resume {config}")
        config, resume = None, config  # `kiln train RUN_DIR --resume`
    if config is not None:
        return load_config(config, overrides), resume
    if not isinstance(resume, str):
        raise KilnError("give a CONFIG, or --resume RUN_DIR to continue a run from its config")
    run_dir = _resumed_run(Path(resume))
    if run_dir is None:
        raise KilnError(f"--resume: {resume} is not a run directory or one of its checkpoints")
    cfg = load_config(RunPaths(run_dir).config, overrides)
    if cfg.run_dir.resolve() == run_dir.resolve():
        return cfg, resume
    # The run continues where it is, wherever it was first started from.
    return cfg.model_copy(update={"output_dir": str(run_dir)}), resume


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies inside it (shorter to retype)."""
    rel = os.path.relpath(path)
    return path.as_posix() if rel.startswith("..") else rel


def check(args: argparse.Namespace) -> None:
    """Load and validate the config, then check what it names (`kiln.preflight`: data files,
    model directories, the run directory and the checkpoint resumed, the extras it needs),
    before anything heavy is imported (`kiln.cli` calls it first): a bad config is answered
    in well under a second, every problem at once, and once, not on every rank. The run
    directory's own rule is the main rank's, as when the engine claims it: another rank
    could find it already prepared by the main one."""
    if args.nproc is None and args.nnodes != "1" and "LOCAL_RANK" not in os.environ:
        raise KilnError(f"--nnodes {args.nnodes}: needs --nproc N (the ranks of each node)")
    if args.nproc is not None and "LOCAL_RANK" not in os.environ:
        _launch(args)  # its arguments too
    args.loaded = cfg, resume = _load(args)
    if args.config is not None and Path(args.config).is_file():
        source = Path(args.config).resolve()
        if source == RunPaths(cfg.run_dir).config.resolve():
            raise KilnError(
                f"output_dir: {cfg.run_dir} is the folder of the config being read "
                f"({args.config}), which the run's config.yaml would replace; choose another"
            )
    preflight(cfg, overwrite=args.overwrite, resume=resume, run_dir=_main_rank())


def _main_rank() -> bool:
    """Whether this process is the one that writes the run directory (RANK unset or 0)."""
    rank = os.environ.get("RANK", "0").strip()
    return not (rank.isdigit() and int(rank) != 0)


def run(args: argparse.Namespace) -> int:
    if args.nproc is not None and "LOCAL_RANK" not in os.environ:
        cfg, _ = args.loaded if hasattr(args, "loaded") else _load(args)
        return _run_launcher(_launch(args), cfg.run_dir, _launch_env(args))
    return rank_code(_train(args))


def rank_code(code: int) -> int:
    """torchrun --max-restarts restarts the ranks on any other exit code than 0: a run that
    ended as it decided (paused, stopped, diverged) or on bad input exits 0 there, or a
    restart would undo the pause, repeat the divergence or fail again. status.json (or the
    ranks' closing line) keeps the code; --nproc reads it back. `kiln.cli` calls it for the
    exit code of a bad input too."""
    if code not in (ExitCode.FINISHED, ExitCode.FAILED) and _max_restarts() > 0:
        return ExitCode.FINISHED
    return code


def _max_restarts() -> int:
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))


def stopped(args: argparse.Namespace | None, stop: StoppedBeforeStart) -> int:
    """`kiln.cli`'s hook for a signal before training started (at any moment: from the first
    line of the CLI to the loop's start): one line, and exit 3 when the run has a checkpoint
    to continue from, else 143 (SIGTERM) or 130 (Ctrl-C). Nothing was written."""
    from kiln.launcher import say

    if stop.resume_from is None and args is not None:  # the trainer sets it once it knows
        with contextlib.suppress(BaseException):  # a bad config, a second signal: none
            stop.resume_from = _resumable(args)
    if stop.resume_from is not None:
        stop.resume_from = _shown(Path(stop.resume_from))
    from kiln.launcher import membership_change

    if not (stop.signum and membership_change()):  # (the agent restarts the ranks: no line)
        say([stop.line()], stop.exit_code)
    return rank_code(stop.exit_code)


def _resumable(args: argparse.Namespace) -> str | None:
    """The run directory this command would have resumed (it has a complete checkpoint);
    None: a new run (or one started from another run's checkpoint)."""
    from kiln.files import is_within, resolve_path

    cfg, resume = args.loaded if hasattr(args, "loaded") else _load(args)
    run = resolve_path(cfg.run_dir, "output_dir")
    if resume is None:
        resume = cfg.checkpoint.resume == "auto"
    if not resume or (isinstance(resume, str) and not is_within(resolve_path(resume), run)):
        return None  # a new run, or one started from another run's checkpoint
    checkpoints = RunPaths(run).checkpoints.glob(f"{STEP_PREFIX}*")
    return str(run) if any((p / MANIFEST).is_file() for p in checkpoints) else None


def _collective_failed(exc: Exception) -> int | None:
    """On N ranks, when `exc` is the process group failing (a collective timed out, a peer
    died): print where this rank was, and the backend's error, on stderr; exit code 1."""
    from kiln.rank import RankContext

    rank = RankContext.current()
    failed = rank.failure(exc)
    if failed is None:
        return None
    failed.report(rank.rank)  # already done by the trainer, unless setup failed
    return ExitCode.FAILED


def _train(args: argparse.Namespace) -> int:
    """This process's part of the run (the whole run on one process); its exit code."""
    from kiln.engine.console import start_console_log
    from kiln.engine.status import final_state
    from kiln.job import build_trainer
    from kiln.launcher import membership_change
    from kiln.metrics.display import format_metric

    if int(os.environ.get("RANK", 0)) != 0:  # the main rank tells the story; others warn
        logging.getLogger("kiln").setLevel(logging.WARNING)
    else:  # RUN_DIR/train.log: what it prints, once the run directory is accepted; `kiln.cli`
        start_console_log()  # stops it after the closing line
    if not hasattr(args, "loaded"):  # `kiln.cli` checked it first; a direct call checks here
        check(args)
    cfg, resume = args.loaded
    try:
        trainer = build_trainer(  # this process is the run's: each step's memory is kept
            cfg, owns_process=True, overwrite=args.overwrite, resume=resume
        )
        try:
            result = trainer.fit()
        finally:
            trainer.rank.teardown()
    except Exception as exc:  # a signal before the loop (StoppedBeforeStart): `stopped`
        failed = _collective_failed(exc)
        if failed is None:
            raise
        return failed
    s = result.summary
    state, code = final_state(result.stop)
    if not trainer.rank.is_main:  # the main rank reports
        return code
    if state == "diverged":  # the verdict, and the last checkpoint (written before it)
        good = result.checkpoint_paths[-1] if result.checkpoint_paths else None
        print(f"kiln: {s['stop_reason']}", file=sys.stderr)
        print(
            f"kiln: last complete checkpoint: {good or 'none'}; anomalies: "
            f"{_shown(RunPaths(result.run_dir).anomalies)}",
            file=sys.stderr,
        )
        return code
    if state != "finished":  # paused (SIGTERM/SIGINT) or stopped (pruned)
        where = result.checkpoint_paths[-1] if result.checkpoint_paths else result.run_dir
        if state == "paused" and membership_change():  # torchrun's agent restarts the ranks
            print(f"\nmembership change at step {s['steps']}: checkpoint {where}")
            return code
        print(f"\n{state} at step {s['steps']} ({s['stop_reason']}); checkpoint: {where}")
        print(f"continue with: kiln train --resume {_shown(result.run_dir)}")
        return code
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
            f"{val['val_loss']:.4f} (step {s['steps']}), "
            + (
                f"perplexity {format_metric(val['val_ppl'], 2)}"
                if "val_ppl" in val
                else f"reward accuracy {val.get('val_rewards/accuracies', float('nan')):.3f}"
            )
        )
    print(f"final model: {result.final_dir}")
    if result.sample is not None:
        print("\n--- sample ---\n" + result.sample + "\n--------------")
    return ExitCode.FINISHED
