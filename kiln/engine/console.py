"""The console log: what `kiln train` prints, also written to RUN_DIR/train.log.

`start_console_log()` (the `kiln train` command, main rank only) puts a tee on sys.stdout and
sys.stderr and on the logging handlers that write to them, so every line the command prints
(progress, warnings, the final lines, a closing error line) is also kept. Lines are held in
memory until the run directory is accepted (`RunDir.prepare`: a fresh train.log, after an
`--overwrite` has removed the old one; `RunDir.resume`: appended to), so a command refused
before that (a bad config, a run directory in use) writes nothing there.
`stop_console_log()` (`kiln.cli`, after the closing line) puts the streams back.

What the file gets is the text of each line: a rich progress bar's redraws are not in it
(`kiln.callbacks.progress` records a plain line per log step instead), ANSI colour codes are
dropped, and of a line redrawn with carriage returns only its last state is kept. Light to
import (the standard library only).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from pathlib import Path
from typing import IO, Any

__all__ = [
    "ConsoleLog",
    "current_console_log",
    "record_line",
    "start_console_log",
    "stop_console_log",
    "terminal",
]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
_MAX_HELD = 10_000
"""Lines held before the run directory is accepted (data preparation can be chatty); beyond
this the oldest are dropped."""


class _Tee:
    """A text stream that writes to `raw` and gives each write to the console log."""

    def __init__(self, raw: IO[str], log: ConsoleLog, name: str) -> None:
        self.raw, self._log, self._name = raw, log, name

    def write(self, text: str) -> int:
        written = self.raw.write(text)
        self._log.feed(self._name, text)
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding, ...
        return getattr(self.raw, name)


def terminal(stream: Any) -> Any:
    """The stream under a console-log tee (itself when it is not one): where a live display
    (a rich progress bar) draws, without its redraws going into train.log."""
    return stream.raw if isinstance(stream, _Tee) else stream


class ConsoleLog:
    """Keeps the lines written to this process's stdout and stderr; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._held: list[str] = []
        self._dropped = 0
        self._partial: dict[str, str] = {}
        self._file: IO[str] | None = None
        self._path: Path | None = None
        self._closed = False
        self._streams: dict[str, Any] = {}

    # ---- the streams ----------------------------------------------------------------------

    def install(self) -> ConsoleLog:
        """Tee sys.stdout, sys.stderr and the logging handlers that write to them."""
        originals = {"stdout": sys.stdout, "stderr": sys.stderr}
        tees = {name: _Tee(stream, self, name) for name, stream in originals.items()}
        self._streams = {name: (originals[name], tee) for name, tee in tees.items()}
        sys.stdout, sys.stderr = tees["stdout"], tees["stderr"]
        by_stream = {id(stream): tees[name] for name, stream in originals.items()}
        for handler in _stream_handlers():
            tee = by_stream.get(id(handler.stream))
            if tee is not None:
                handler.setStream(tee)  # type: ignore[arg-type]
        return self

    def close(self) -> None:
        """Put the streams back (those still ours), write any unfinished line, close the file.
        A tee something still holds (a handler made while the log ran) just passes through."""
        for handler in _stream_handlers():  # ours, and those made on a tee since
            stream = handler.stream
            if isinstance(stream, _Tee) and stream._log is self:
                handler.setStream(stream.raw)
        for name, (original, tee) in self._streams.items():
            if getattr(sys, name) is tee:
                setattr(sys, name, original)
        self._streams = {}
        with self._lock:
            self._closed = True
            for rest in self._partial.values():
                if rest:
                    self._line(rest)
            self._partial = {}
            if self._file is not None:
                self._file.close()
                self._file = None

    # ---- the lines ------------------------------------------------------------------------

    def feed(self, name: str, text: str) -> None:
        """Text written to stream `name`: its complete lines are kept."""
        with self._lock:
            if self._closed:
                return
            *lines, rest = (self._partial.get(name, "") + text).split("\n")
            self._partial[name] = rest
            for line in lines:
                self._line(line)

    def record(self, line: str) -> None:
        """Keep `line` without printing it (a line shown some other way, e.g. in a live bar)."""
        with self._lock:
            if not self._closed:
                self._line(line)

    def _line(self, line: str) -> None:
        line = _ANSI.sub("", line.rstrip("\r").rpartition("\r")[2])
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
            return
        self._held.append(line)
        if len(self._held) > _MAX_HELD:
            del self._held[0]
            self._dropped += 1

    def attach(self, path: Path, *, append: bool) -> None:
        """Write to `path` from now on (appended to, or started afresh), after the lines held
        so far. Called once the run directory is accepted; a later call moves to `path`."""
        with self._lock:
            if self._file is not None and self._path == path:
                return  # a rollback's resume: the same file goes on
            if self._file is not None:
                self._file.close()
            self._file = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
            self._path = path
            if self._dropped:
                self._file.write(f"[{self._dropped} earlier lines not kept]\n")
            self._file.writelines(line + "\n" for line in self._held)
            self._file.flush()
            self._held, self._dropped = [], 0


def _stream_handlers() -> list[logging.StreamHandler[Any]]:
    """Every logging handler that writes to a stream it holds (files excepted), on any logger."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    found: list[logging.StreamHandler[Any]] = []
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if not isinstance(handler, logging.StreamHandler) or handler in found:
                continue
            # A file's handler, and one whose stream is sys.stderr at each write
            # (logging.lastResort: a property, through the tee already), stay as they are.
            fixed = "stream" in vars(handler)
            if fixed and not isinstance(handler, logging.FileHandler):
                found.append(handler)
    return found


_current: ConsoleLog | None = None


def start_console_log() -> ConsoleLog:
    """Start keeping what this process prints (ending a log already started)."""
    global _current
    stop_console_log()
    _current = ConsoleLog().install()
    return _current


def stop_console_log() -> None:
    """Stop keeping what this process prints, if a log was started: streams back, file closed."""
    global _current
    if _current is not None:
        _current.close()
        _current = None


def current_console_log() -> ConsoleLog | None:
    """The log `start_console_log` started, or None (the Python API: nothing is kept)."""
    return _current


def record_line(line: str) -> None:
    """Keep `line` in the console log, if one is started, without printing it."""
    if _current is not None:
        _current.record(line)
