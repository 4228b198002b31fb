"""Task formats: how a row becomes the text(s) a task trains on.

A `TaskFormat` renders one row to a tuple of strings: `(text,)` for causal_lm, `(source, target)`
for seq2seq, `(prompt, response)` for instruction, `(conversation,)` (JSON) for chat
(`kiln.data.chat`), `(form, prompt, chosen, rejected)` for preference (`kiln.data.preference`).
The same rendering feeds field checks, deduplication and tokenization, so a row is judged by
exactly the text the model will see. A new task adds a format and a branch in `make_format`.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from kiln.data.sources import Row, _Problems, json_type, where
from kiln.errors import DataError

if TYPE_CHECKING:
    from kiln.config import RunConfig

__all__ = [
    "CausalFormat",
    "InstructionFormat",
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
    """A template field whose value is null (reported with the row's location)."""


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
    # RecursionError: a Python row nested ~1000 levels (files are checked when read).
    except (AttributeError, IndexError, TypeError, ValueError, RecursionError) as exc:
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


def _field_names(template: str) -> set[str]:
    """Top-level row fields a (checked) template reads: `{a.b}` and `{a[0]}` read `a`."""
    names = set()
    for _, name, _, _ in string.Formatter().parse(template):
        if name:
            names.add(name.split(".", 1)[0].split("[", 1)[0])
    return names


@dataclass(frozen=True)
class InstructionFormat:
    """instruction: a prompt and a response, each a template rendered over the row's fields.

    With one template pair (`data.prompt_template`, `data.response_template`) every row uses
    it. With several (`data.templates`: mixed sample formats), each row gets one pair, picked
    uniformly by a hash of (seed, the row's file name, its line number), or of (seed, its index)
    for a plain dict without a location. The pick never reads a global RNG, and the row's
    location does not change when rows before it are filtered out or split off, so the same row
    gets the same template in every run with that seed, on every resume, and in every stage
    that renders it (checks, dedup, tokenizer corpus, tokenization). The file's directory is
    left out, so moving the data keeps the assignment.

    Every row must hold the fields of *every* template, not just of the one it got, so whether
    a file is valid does not depend on the seed.

    Args:
        templates: (prompt, response) format-string pairs; at least one.
        seed: the run's seed (`cfg.seed`), for the per-row pick.
        keys: config keys of each pair's (prompt, response), for messages; default
            `data.templates[i].prompt` and `.response`.
    """

    templates: tuple[tuple[str, str], ...] = (("{prompt}", "{response}"),)
    seed: int = 0
    keys: tuple[tuple[str, str], ...] | None = None
    parts: ClassVar[tuple[str, ...]] = ("prompt", "response")
    _fields: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.templates:
            raise ValueError("InstructionFormat needs at least one (prompt, response) template")
        if self.keys is None:
            keys = tuple(
                (f"data.templates[{i}].prompt", f"data.templates[{i}].response")
                for i in range(len(self.templates))
            )
            object.__setattr__(self, "keys", keys)
        elif len(self.keys) != len(self.templates):
            raise ValueError(f"{len(self.keys)} keys for {len(self.templates)} templates")
        names: set[str] = set()
        for (prompt, response), (prompt_key, response_key) in self._pairs():
            _check_template(prompt, prompt_key)
            _check_template(response, response_key)
            names |= _field_names(prompt) | _field_names(response)
        object.__setattr__(self, "_fields", frozenset(names))

    @classmethod
    def from_config(cls, cfg: RunConfig) -> InstructionFormat:
        """The format of `cfg.data`: `templates` when set, else the prompt/response pair."""
        data = cfg.data
        if data.templates:
            return cls(tuple((t.prompt, t.response) for t in data.templates), cfg.seed)
        keys = (("data.prompt_template", "data.response_template"),)
        return cls(((data.prompt_template, data.response_template),), cfg.seed, keys)

    def _pairs(self) -> list[tuple[tuple[str, str], tuple[str, str]]]:
        assert self.keys is not None
        return list(zip(self.templates, self.keys, strict=True))

    def template_index(self, row: Mapping[str, Any], index: int) -> int:
        """Which template pair `row` (the `index`-th of its list) is rendered with."""
        n = len(self.templates)
        if n == 1:
            return 0
        if isinstance(row, Row):
            where_key = f"{PurePath(row.source).name}\x00{row.line}"
        else:
            where_key = f"\x00{index}"
        # blake2b, not hash(): Python salts str hashes per process.
        digest = hashlib.blake2b(f"{self.seed}\x00{where_key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % n

    def render(self, row: Mapping[str, Any], index: int) -> tuple[str, str]:
        """The row's (prompt, response) pair (see `TaskFormat.render`)."""
        pairs = self._pairs()
        if len(pairs) > 1 and any(row.get(name) is None for name in self._fields):
            # Name the first template the row cannot fill, whichever one it was given.
            for (prompt, response), (pk, rk) in pairs:
                render_template(prompt, row, pk, index)
                render_template(response, row, rk, index)
        (prompt, response), (pk, rk) = pairs[self.template_index(row, index)]
        return render_template(prompt, row, pk, index), render_template(response, row, rk, index)


def make_format(cfg: RunConfig) -> TaskFormat:
    """The task format a run config asks for."""
    if cfg.task == "causal_lm":
        return CausalFormat(cfg.data.text_field)
    if cfg.task == "seq2seq":
        return Seq2SeqFormat(cfg.data.source_template, cfg.data.target_template)
    if cfg.task == "instruction":
        return InstructionFormat.from_config(cfg)
    if cfg.task == "chat":
        from kiln.data.chat import ChatFormat

        return ChatFormat(cfg.data.messages_field)
    if cfg.task == "preference":
        from kiln.data.preference import PreferenceFormat

        return PreferenceFormat()
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
