"""Progress lines for data preparation that takes long, on the "kiln" logger.

Reading, tokenizer training and tokenization of a big corpus can take minutes; a silent
terminal does not tell a slow step from a hang. A `Progress` reports such a step while it runs
and when it ends, and says nothing about a quick one, so tests and the quickstart stay quiet.
"""

from __future__ import annotations

import logging
import time

__all__ = ["EVERY_S", "QUIET_S", "Progress"]

log = logging.getLogger("kiln")

QUIET_S = 2.0
"""A phase that ends sooner than this many seconds is not reported."""
EVERY_S = 5.0
"""Seconds between two progress lines of a running phase (the first comes after as long)."""


class Progress:
    """Reports one phase of data preparation, only when it is slow.

    `update` logs how far the phase got, at most every `EVERY_S` seconds; `done` logs a closing
    line when the phase took `QUIET_S` seconds or more. The thresholds are read when the phase
    starts, so a test can lower them.

    Args:
        what: the phase, e.g. "tokenizing training data (train.jsonl)".
        total: the amount of work `update` counts towards, for a percentage; None: unknown.
        unit: what `update` counts, e.g. "texts" or "MB".
    """

    def __init__(self, what: str, total: int | None = None, unit: str = "rows") -> None:
        self.what, self.total, self.unit = what, total, unit
        self.every, self.quiet = EVERY_S, QUIET_S
        self.start = time.monotonic()
        self._next = self.start + self.every

    def update(self, done: int) -> None:
        """Log `done` (of `total`) if the last line is `EVERY_S` seconds old; cheap otherwise."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every
        if self.total:
            amount = f"{done:,}/{self.total:,} {self.unit} ({100 * done / self.total:.0f}%)"
        else:
            amount = f"{done:,} {self.unit}"
        log.info("%s: %s, %.0fs so far", self.what, amount, now - self.start)

    def done(self, summary: str) -> float:
        """Log `summary` with the time taken, if the phase was slow; returns that time (s)."""
        elapsed = time.monotonic() - self.start
        if elapsed >= self.quiet:
            log.info("%s in %.1fs", summary, elapsed)
        return elapsed
