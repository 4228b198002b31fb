"""Plug-ins that talk to the outside world off the training thread, under one failure policy.

Trackers (`log.loggers`) and notification senders (`notify.senders`) each get a `Lane`: a
daemon thread of their own that runs their calls in order, so a slow, hanging or dead endpoint
delays only its own calls, never a step or another plug-in. The policy, the same for both:

- The first error of a lane gets one warning naming the setting and the plug-in, with the
  error's type and first line; later errors are debug lines. Every line is redacted of the
  lane's secrets (a webhook URL, a token): an error text may quote them.
- A lane that `switch_off`s skips every later call after its first error (a tracker's run is in
  an unknown state then); one that does not keeps trying (each notification stands alone, and
  the end or failure note after a passing outage is the one that matters most).
- `drain` ends a group of lanes against one deadline: they finish their queued calls in
  parallel, and a lane still busy then is abandoned with one warning: it drops what is still
  queued, and its daemon thread never holds up the process's exit.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kiln.errors import first_line

__all__ = ["Lane", "Worker", "describe", "drain", "redact"]

log = logging.getLogger("kiln")

_STOP = object()


def describe(exc: BaseException) -> str:
    """An error as one line for a warning: its type and the first line of its message."""
    return f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with each secret, and each part of one that an error may quote, as ***."""
    forms: set[str] = set()
    for secret in secrets:
        if not secret:
            continue
        forms |= {secret, urllib.parse.quote(secret, safe="")}
        # http.client quotes only the request path when it rejects a URL ("URL can't contain
        # control characters. '/services/T0/B0/XYZ ...'"): the secret part of a webhook URL.
        url = urllib.parse.urlsplit(secret)
        if url.scheme and url.netloc:
            forms |= {url.path, url.query, url.password or ""}
    for form in sorted((f for f in forms if len(f) > 1), key=len, reverse=True):
        text = text.replace(form, "***")
    return text


class Worker:
    """Runs `submit`ted calls one at a time, in order, on a daemon thread (started by the
    first call). A call that raises is reported to `on_error`, and the worker goes on."""

    def __init__(self, name: str, on_error: Callable[[BaseException], None]) -> None:
        self.name = name
        self._on_error = on_error
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue `fn(*args)`; ignored once the worker is stopped."""
        if self._closed:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._queue.put((fn, args))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception as exc:
                self._on_error(exc)

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


class Lane:
    """One plug-in's own thread under the shared failure policy (see the module docstring).

    Args:
        setting: the config key the plug-in comes from, which every log line starts with
            ("log.loggers", "notify").
        name: the plug-in's name in log lines ("mlflow", "slack").
        secrets: values redacted from every log line of this lane.
        switch_off: skip every call after the first error (else keep going).
        on_off: called once on the lane's thread when it switches off (a best-effort cleanup;
            its own errors are ignored).
    """

    def __init__(
        self,
        setting: str,
        name: str,
        *,
        secrets: Sequence[str] = (),
        switch_off: bool = True,
        on_off: Callable[[], None] | None = None,
    ) -> None:
        self.setting = setting
        self.name = name
        self.secrets = tuple(secrets)
        self.switch_off = switch_off
        self.failed = False
        """An error was reported (touched only by the lane's own thread)."""
        self._on_off = on_off
        # Set when `drain` stops waiting: the thread then drops what is still queued instead
        # of making stale calls (and warnings) long after the run.
        self._abandoned = threading.Event()
        self.worker = Worker(f"kiln-{setting}-{name}", on_error=self.fail)

    @property
    def off(self) -> bool:
        """Calls are skipped: the lane switched off after an error, or was abandoned."""
        return (self.failed and self.switch_off) or self._abandoned.is_set()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the lane's thread, after the calls already queued; an error it
        raises is reported by `fail`."""
        self.worker.submit(self._call, fn, args)

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if not self.off:
            fn(*args)

    def wait(self, seconds: float) -> bool:
        """Sleep on the lane's thread (a retry's backoff); True, at once, if it was abandoned."""
        return self._abandoned.wait(seconds)

    def fail(self, exc: BaseException, doing: str = "") -> None:
        """Report an error of this lane: one warning for the first (`doing` says what failed:
        " to send the end notification"), a debug line for any later one."""
        text = f"{self.name} failed{doing} ({describe(exc)})"
        if self.failed or self._abandoned.is_set():
            self._log(logging.DEBUG, text)
            return
        self.failed = True
        if not self.switch_off:
            self._log(logging.WARNING, f"{text}; training goes on (later failures not reported)")
            return
        self._log(logging.WARNING, f"{text}; it is off for the rest of the run")
        if self._on_off is not None:
            with contextlib.suppress(Exception):
                self._on_off()

    def abandon(self) -> None:
        """Drop the calls still queued (one in progress finishes on its own)."""
        self._abandoned.set()

    def _log(self, level: int, message: str) -> None:
        # The whole line: an error text can quote a URL, and a plug-in picks its own name.
        log.log(level, "%s", redact(f"{self.setting}: {message}", self.secrets))


def drain(lanes: Sequence[Lane], timeout_s: float, timeout_key: str) -> list[Lane]:
    """Stop `lanes` and let them finish their queued calls, in parallel, for at most
    `timeout_s` in total; abandon those still busy then, with one warning naming them and the
    setting `timeout_key`. Returns the abandoned lanes."""
    # Stop all first, then wait against one deadline: one slow endpoint does not eat the time
    # of the lanes after it, and the whole drain takes at most timeout_s however many hang.
    for lane in lanes:
        lane.worker.stop()
    deadline = time.monotonic() + timeout_s
    busy = [lane for lane in lanes if not lane.worker.join(max(0.0, deadline - time.monotonic()))]
    for lane in busy:
        lane.abandon()
    if busy:
        names = ", ".join(lane.name for lane in busy)
        them = "it" if len(busy) == 1 else "them"
        message = (
            f"{busy[0].setting}: {names}: still busy after {timeout_s:g} s ({timeout_key}); "
            f"not waiting for {them}"
        )
        log.warning("%s", redact(message, [s for lane in busy for s in lane.secrets]))
    return busy
