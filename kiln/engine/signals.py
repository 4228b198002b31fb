"""Stop requests from the outside: SIGTERM and SIGINT ask the loop to checkpoint and exit;
SIGUSR1 (a sweep pruning the run) asks it to checkpoint and stop without a final model.

Before training starts (starting Python, setup: data, tokenizer, model) there is nothing to
save, so a signal stops at once with `StoppedBeforeStart` (`stop_before_start` installs that
first thing, before torch is imported): the CLI says so in one line and exits with
`ExitCode.PAUSED` (3) when the run can be resumed from an earlier checkpoint, else 128 + the signal
number (143 for SIGTERM, 130 for SIGINT). Once the loop runs (`arm()`), the first signal only
sets a flag; the loop saves a checkpoint at its next safe point (a step boundary, or between
validation batches) and exits with `ExitCode.PAUSED`. A second Ctrl-C aborts at once
(KeyboardInterrupt); checkpoints are atomic, so that loses nothing saved.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from kiln.runs import ExitCode

__all__ = ["StopSignals", "StoppedBeforeStart", "as_stopped", "stop_before_start"]


_PRUNE = getattr(signal, "SIGUSR1", None)
"""A sweep prunes a trial with SIGUSR1: checkpoint, no final/, state stopped (exit 3)."""


class StoppedBeforeStart(BaseException):
    """A signal arrived during setup, before the first step: nothing new was written.

    A BaseException, like KeyboardInterrupt, so no `except Exception` in setup swallows it.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.resume_from: str | None = None
        """The run directory to resume, when it already has a checkpoint (set by the trainer)."""
        super().__init__(f"stopped by {self.name} before training started")

    @property
    def exit_code(self) -> int:
        """ExitCode.PAUSED when resumable, else the shell's code for death by this signal."""
        return ExitCode.PAUSED if self.resume_from is not None else 128 + self.signum

    def line(self) -> str:
        """kiln's one line about it: what stopped, and how to go on."""
        if self.resume_from is None:
            after = "nothing to resume (start it again)"
        else:
            after = f"continue with: kiln train --resume {self.resume_from}"
        return f"kiln: {self}; {after}"


_DURING_SETUP: list[int] = []
"""The signals that raised `StoppedBeforeStart` since the CLI started (or the loop's handlers
were installed), until the loop starts: the exception may not reach the CLI as itself. Code
that catches every exception can swallow it (the start then goes on), or a library can turn it
into its own error (it would end with a traceback and exit 1); `StopSignals.start` and
`as_stopped` make either end as the signal meant."""


def as_stopped(exc: BaseException) -> BaseException:
    """`exc`, or the `StoppedBeforeStart` it stands for: a signal during setup whose exception
    was turned into another one on its way up."""
    if isinstance(exc, StoppedBeforeStart) or not _DURING_SETUP:
        return exc
    return StoppedBeforeStart(_DURING_SETUP[0])


def _stop_setup(signum: int) -> None:
    _DURING_SETUP.append(signum)
    raise StoppedBeforeStart(signum)


def stop_before_start() -> Callable[[], None]:
    """From now on SIGTERM and SIGINT raise `StoppedBeforeStart` at once, until the loop's
    `StopSignals` take over. `kiln.cli` calls it first thing, before torch is imported, so a
    signal at any moment of the start ends with kiln's line and exit code (not the shell's
    bare 143). Returns the function that puts the previous handlers back (both do nothing
    outside the main thread, where Python cannot install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _DURING_SETUP.clear()

    def stop(signum: int, frame: FrameType | None) -> None:
        _stop_setup(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            if handler is not None:  # None: installed from C, which Python cannot put back
                signal.signal(sig, handler)

    return restore


class StopSignals:
    """Context manager that routes SIGTERM/SIGINT to `on_stop(reason)` and SIGUSR1 to
    `on_prune()` (when given) while training.

    Until `arm()` (during setup) a signal raises `StoppedBeforeStart` at once. Outside the main
    thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(
        self, on_stop: Callable[[str], None], on_prune: Callable[[], None] | None = None
    ) -> None:
        self.on_stop = on_stop
        self.on_prune = on_prune
        self.received: str | None = None
        self.armed = False
        self._previous: dict[int, Any] = {}

    def start(self) -> None:
        """Setup is done: a signal during it whose `StoppedBeforeStart` was swallowed on the
        way stops the run now, as it would have then; from here a signal pauses the loop."""
        if _DURING_SETUP:
            raise StoppedBeforeStart(_DURING_SETUP[0])
        self.arm()

    def arm(self) -> None:
        """From now on a signal asks the loop to checkpoint and stop."""
        self.armed = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.armed:
            _stop_setup(signum)
        name = signal.Signals(signum).name
        if signum == _PRUNE and self.on_prune is not None:
            self.received = self.received or name
            self.on_prune()
            return
        if self.received is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        self.received = name
        self.on_stop(f"signal {name}")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            prune = [_PRUNE] if _PRUNE is not None and self.on_prune is not None else []
            for sig in (signal.SIGTERM, signal.SIGINT, *prune):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        _DURING_SETUP.clear()  # the run is over, however it ended
