"""A background thread that runs submitted calls in order, so slow I/O never blocks training."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["Worker"]

log = logging.getLogger("kiln")

_STOP = object()


class Worker:
    """Runs `submit`ted calls one at a time, in order, on a daemon thread.

    A call that raises is reported to `on_error` (the worker keeps going). `close(timeout)`
    waits at most `timeout` seconds for the queue to drain; a daemon thread that is still
    stuck in a request (a dead endpoint) is abandoned and never holds up the process's exit.
    """

    def __init__(self, name: str, on_error: Callable[[BaseException], None] | None = None) -> None:
        self.name = name
        self._on_error = on_error
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue `fn(*args, **kwargs)`; ignored once the worker is closed."""
        if self._closed:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._queue.put((fn, args, kwargs))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fn, args, kwargs = item
            try:
                fn(*args, **kwargs)
            except Exception as exc:
                if self._on_error is not None:
                    self._on_error(exc)
                else:
                    log.debug("%s: %s", self.name, exc)

    def pending(self) -> int:
        """Calls still queued (not counting one in progress)."""
        return self._queue.qsize()

    def stop(self) -> None:
        """Stop taking calls; the queued ones still run. Does not wait (see `join`)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a stopped worker to finish its queue; True if it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self, timeout: float) -> bool:
        """Stop taking calls, wait up to `timeout` s for the queued ones; True if all ran.

        To close several workers within one deadline, `stop` them all first and then `join`
        each with what is left, so they drain in parallel.
        """
        self.stop()
        return self.join(timeout)
