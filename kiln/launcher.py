"""What a user reads from `kiln train --nproc N`: kiln's lines, each once, not torchrun's.

`kiln train --nproc N` runs `python -m kiln.launcher TORCHRUN_ARGS`, which is torchrun
(`torch.distributed.run`) with two changes, and hands every rank a folder (`LINES_ENV`):

- A rank's closing lines (`kiln: error: ...` for bad input, `kiln: stopped by SIGTERM ...`)
  go through `say`: on a rank of such a launch they are written to that folder instead of
  stderr, and the launcher prints each distinct line once when the ranks have ended
  (`closing_lines`). Bad data is read by every rank: without this the user reads its line N
  times. The lines of ranks that torchrun itself stopped (SIGTERM to the peers of a failed
  rank) are left out unless the user sent the signal.
- torchrun's account of a failure (its "Sending process ... closing signal" and "failed
  (exitcode: 2)" log lines, and a `ChildFailedError` traceback) is held back and dropped when a
  rank said what went wrong; a rank that said nothing (a crash with its own traceback, a rank
  killed by a signal) still gets torchrun's table of failures, without the traceback.

Light to import (no torch): `kiln.cli` calls `say` on every run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from kiln.engine.elastic import ELASTIC_ENV, SIGNALLED
from kiln.runs import ExitCode

__all__ = ["ELASTIC_ENV", "LINES_ENV", "SIGNALLED", "closing_lines", "say", "torchrun"]

LINES_ENV = "KILN_RANK_LINES"
"""The folder where the ranks of `kiln train --nproc` leave their closing lines."""


def membership_change() -> bool:
    """Whether a SIGTERM to this rank is torchrun's agent restarting an elastic launch's ranks
    for a membership change (not the user's stop)."""
    folder = os.environ.get(LINES_ENV)
    return bool(os.environ.get(ELASTIC_ENV) and folder and not (Path(folder) / SIGNALLED).exists())


_STOPPED = (130, 143)
"""Exit codes of a rank stopped by SIGINT/SIGTERM before training started."""


def say(lines: list[str], code: int) -> None:
    """Print kiln's closing lines on stderr, or, on a rank started by `kiln train --nproc`,
    leave them (with the rank's exit code) for the launcher to print once."""
    folder, rank = os.environ.get(LINES_ENV), os.environ.get("RANK")
    if folder and rank is not None and rank.lstrip("-").isdigit():
        from kiln.engine.console import record_line

        for line in lines:  # the launcher prints it; the run's train.log keeps it too
            record_line(line)
        _record(Path(folder), int(rank), lines, code)
        return
    for line in lines:
        print(line, file=sys.stderr)


def _record(folder: Path, rank: int, lines: list[str], code: int) -> None:
    records = "".join(
        json.dumps({"rank": rank, "code": code, "line": line}) + "\n" for line in lines
    )
    try:
        with open(folder / f"rank-{rank}.jsonl", "a") as f:
            f.write(records)
    except OSError:  # the launcher's folder is gone: say it here
        for line in lines:
            print(line, file=sys.stderr)


def _read(folder: Path) -> list[dict[str, Any]]:
    records = []
    for path in folder.glob("rank-*.jsonl"):
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # torn by a kill
                continue
            if isinstance(record, dict) and isinstance(record.get("line"), str):
                records.append(record)
    # Rank order, each rank's lines as it wrote them.
    return sorted(records, key=lambda r: r.get("rank", 0))


def closing_lines(folder: Path, *, signalled: bool) -> tuple[list[str], int | None]:
    """The distinct lines the ranks left in `folder`, in rank order, and the exit code of the
    first rank that said something (None: no rank did). When the user sent no signal, a
    rank's "stopped by SIGTERM" is torchrun ending the peers of a failed rank: left out."""
    records = _read(folder)
    if not signalled:
        cause = [r for r in records if r.get("code") not in _STOPPED]
        records = cause or records  # only stops: someone else signalled the ranks
    lines = list(dict.fromkeys(str(r["line"]) for r in records))
    code = records[0].get("code") if records else None
    return lines, code if isinstance(code, int) else None


class _Held(logging.Filter):
    """Holds back the records of torchrun's process handling (its account of a failure),
    to be dropped or let through once the outcome is known."""

    NAME = "torch.distributed.elastic.multiprocessing"

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.loggers = [logging.getLogger(f"{self.NAME}.api")]
        for logger in self.loggers:
            logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def release(self) -> None:
        for logger in self.loggers:
            logger.removeFilter(self)
        for record in self.records:
            logging.getLogger(record.name).handle(record)
        self.records.clear()


def torchrun(argv: list[str]) -> int:
    """torchrun with `argv`, telling a failure only when the ranks did not (its exit code)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.run import parse_args, run

    held = _Held()
    args = parse_args(argv)
    try:
        run(args)
    except RendezvousTimeoutError:  # too few nodes: the last complete checkpoint is the run's
        line = (
            f"kiln: rendezvous at {args.rdzv_endpoint}: fewer than {args.nnodes.split(':')[0]} "
            f"nodes joined within its join_timeout ({_join_timeout(args.rdzv_conf)} s); the "
            "run keeps its last complete checkpoint: run the same command again to continue"
        )
        folder = os.environ.get(LINES_ENV)
        if folder:  # `kiln train --nproc` prints it and marks the run paused
            _record(Path(folder), -1, [line], ExitCode.PAUSED)
        else:
            print(line, file=sys.stderr)
        return ExitCode.PAUSED
    except ChildFailedError as exc:
        folder = os.environ.get(LINES_ENV)
        if not (folder and any(Path(folder).glob("rank-*.jsonl"))):
            held.release()
            print(exc.format_msg(), file=sys.stderr)
        return ExitCode.FAILED
    except SignalException as exc:  # before the ranks ran (else they get the signal):
        return 128 + int(exc.sigval)  # the launcher tells it (`kiln.commands.train`)
    held.release()
    return ExitCode.FINISHED


def _join_timeout(conf: str) -> str:
    """join_timeout from torchrun's --rdzv-conf (torch's default: 600)."""
    for item in (conf or "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "join_timeout":
            return value.strip()
    return "600"


if __name__ == "__main__":
    sys.exit(torchrun(sys.argv[1:]))
