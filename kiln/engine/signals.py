"""Stop requests from the outside: SIGTERM and SIGINT ask the loop to checkpoint and exit.

The first signal only sets a flag; the loop saves a checkpoint at its next safe point (a step
boundary, or between validation batches) and exits with `EXIT_STOPPED`. A second Ctrl-C
aborts at once (KeyboardInterrupt); checkpoints are atomic, so that loses nothing saved.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

__all__ = ["EXIT_STOPPED", "StopSignals"]

EXIT_STOPPED = 3
"""Exit code of `kiln train` after a signal stopped it and a checkpoint was written."""


class StopSignals:
    """Context manager that routes SIGTERM/SIGINT to `on_stop(reason)` while training.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self, on_stop: Callable[[str], None]) -> None:
        self.on_stop = on_stop
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        self.received = name
        self.on_stop(f"signal {name}")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
