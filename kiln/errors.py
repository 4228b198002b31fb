"""User-facing errors: bad config, data, arguments or files.

The CLI prints each as one line per problem (no traceback) and exits with code 2.
"""

from __future__ import annotations

__all__ = ["DataError", "KilnError", "ModelError", "first_line"]


class KilnError(Exception):
    """Base class for errors caused by the user's input; `problems` holds one line each."""

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in self.problems))


class DataError(KilnError):
    """Bad training or validation data; messages name `file:line`."""


class ModelError(KilnError):
    """A model or tokenizer that cannot be loaded or does not fit the task."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an error's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
