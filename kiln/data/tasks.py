"""Task formats: how a row becomes the text(s) a task trains on.

A `TaskFormat` renders one row to a tuple of strings: `(text,)` for causal_lm, `(source, target)`
for seq2seq. The same rendering feeds field checks, deduplication and tokenization, so a row is
judged by exactly the text the model will see. A new task (e.g. instruction tuning) adds a format
and a branch in `make_format`.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from kiln.data.sources import _Problems, json_type, where
from kiln.errors import DataError

if TYPE_CHECKING:
    from kiln.config import RunConfig

__all__ = [
    "CausalFormat",
    "Seq2SeqFormat",
    "TaskFormat",
    "make_format",
    "render_rows",
    "render_template",
]


class TaskFormat(Protocol):
    """Renders a row into the strings a task needs; raises DataError naming the row."""

    parts: ClassVar[tuple[str, ...]]
    """Names of the rendered strings, in order, e.g. ("source", "target")."""

    def render(self, row: Mapping[str, Any], index: int) -> tuple[str, ...]:
        """Render `row` (the `index`-th of its list, for messages about plain dicts)."""
        ...


class _RowError(DataError):
    """A problem with one row; `key` groups problems that would repeat for every row."""

    def __init__(self, problem: str, key: str | None = None) -> None:
        super().__init__(problem)
        self.key = key


@dataclass(frozen=True)
class CausalFormat:
    """causal_lm: the row's `text_field`, which must be a string."""

    text_field: str = "text"
    parts: ClassVar[tuple[str, ...]] = ("text",)

    def render(self, row: Mapping[str, Any], index: int) -> tuple[str]:
        """The row's text (see `TaskFormat.render`)."""
        if self.text_field not in row:
            raise _RowError(f"{where(row, index)}: missing field '{self.text_field}'")
        value = row[self.text_field]
        if not isinstance(value, str):
            raise _RowError(
                f"{where(row, index)}: field '{self.text_field}' must be a string, "
                f"got {json_type(value)}"
            )
        return (value,)


class _Fields:
    """The row as `str.format_map` sees it: list fields joined by newlines, null is an error."""

    def __init__(self, row: Mapping[str, Any]) -> None:
        self.row = row

    def __getitem__(self, name: str) -> Any:
        value = self.row[name]  # KeyError names the missing field
        if value is None:
            raise _NullField(name)
        if isinstance(value, list):
            return "\n".join(str(item) for item in value)
        return value


class _NullField(Exception):
    pass


def _check_template(template: str, key: str) -> None:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise DataError(f"{key}: invalid template {template!r} ({exc})") from None
    for name in names:
        if name == "" or name.isdigit():
            raise DataError(f"{key}: use named fields like {{title}}, not {{{name}}}")


def render_template(template: str, row: Mapping[str, Any], key: str, index: int = 0) -> str:
    """Render a `str.format` template over a row's fields (list fields joined by "\\n").

    Args:
        template: e.g. "Title: {title}\\nIngredients:\\n{ingredients}".
        row: the row's fields.
        key: the config key of the template, for messages (e.g. "data.source_template").
        index: the row's position, named in messages when `row` is not a `Row`.

    Raises:
        DataError: the template names a field the row lacks (or holds null), or cannot render.
    """
    try:
        return template.format_map(_Fields(row))
    except KeyError as exc:
        name = exc.args[0]
        raise _RowError(
            f"{key}: field '{name}' is not in the rows ({where(row, index)})", f"{key}:{name}"
        ) from None
    except _NullField as exc:
        name = exc.args[0]
        raise _RowError(f"{key}: field '{name}' is null ({where(row, index)})") from None
    except (AttributeError, IndexError, TypeError, ValueError) as exc:
        raise _RowError(f"{key}: cannot render ({exc}) ({where(row, index)})", key) from None


@dataclass(frozen=True)
class Seq2SeqFormat:
    """seq2seq: `source_template` and `target_template` rendered over the row's fields."""

    source_template: str = "{source}"
    target_template: str = "{target}"
    parts: ClassVar[tuple[str, ...]] = ("source", "target")

    def __post_init__(self) -> None:
        _check_template(self.source_template, "data.source_template")
        _check_template(self.target_template, "data.target_template")

    def render(self, row: Mapping[str, Any], index: int) -> tuple[str, str]:
        """The row's (source, target) pair (see `TaskFormat.render`)."""
        return (
            render_template(self.source_template, row, "data.source_template", index),
            render_template(self.target_template, row, "data.target_template", index),
        )


def make_format(cfg: RunConfig) -> TaskFormat:
    """The task format a run config asks for."""
    if cfg.task == "causal_lm":
        return CausalFormat(cfg.data.text_field)
    if cfg.task == "seq2seq":
        return Seq2SeqFormat(cfg.data.source_template, cfg.data.target_template)
    raise ValueError(f"unknown task {cfg.task!r}")


def render_rows(fmt: TaskFormat, rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    """Render every row, collecting problems (one line each) before raising them together.

    Raises:
        DataError: rows that cannot be rendered, each named `file:line`.
    """
    out: list[tuple[str, ...]] = []
    problems = _Problems()
    seen: set[str] = set()
    for i, row in enumerate(rows):
        try:
            out.append(fmt.render(row, i))
        except _RowError as exc:
            # A template field missing from every row is one problem, not one per row.
            if exc.key is None or exc.key not in seen:
                problems.add(exc.problems[0])
            if exc.key is not None:
                seen.add(exc.key)
    problems.raise_if_any()
    return out
