"""The base of every config section, the error a bad config raises, and shared bounds.

Every section refuses inf and nan in float fields and `true`/`false` in number fields, so a
section added later gets both without asking. The bounds below are far beyond any real run;
they exist so that a typo (an extra zero run wild, `1e12`) is an error at validation instead
of a terabyte allocation, an int64 overflow or a timer that cannot be armed.
"""

from __future__ import annotations

import math
import reprlib
import types
import typing
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    ModelWrapValidatorHandler,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from kiln.errors import KilnError

__all__ = [
    "MAX_BATCH",
    "MAX_COUNT",
    "MAX_SECONDS",
    "MAX_TOKENS",
    "ConfigError",
    "Section",
    "short_repr",
    "union_members",
]

MAX_COUNT = 10**12
"""Bound of step counts and cadences (max_steps, every_steps, warmup): beyond any run."""
MAX_BATCH = 65_536
"""Bound of batch sizes and accumulation steps."""
MAX_TOKENS = 1_048_576
"""Bound of token counts: positions, vocabulary, generated tokens, widths of MLPs."""
MAX_SECONDS = 1e6
"""Bound of durations (about 11 days): larger timeouts overflow socket and thread timers."""


class ConfigError(KilnError):
    """A config that cannot be used; `problems` holds one line per problem, each naming a key."""


class _ShortRepr(reprlib.Repr):
    """reprlib with small limits, and no int->str conversion of huge integers."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict = 2, 4, 4, 4
        self.maxstring = self.maxother = self.maxlong = 60

    def repr_int(self, x: int, level: int) -> str:
        # repr() of an int over 4300 digits raises ValueError (CVE-2020-10735 limit).
        if x.bit_length() > 200:
            digits = int(x.bit_length() * math.log10(2))  # the count, or one less
            return f"<integer of {digits + (abs(x) >= 10**digits)} digits>"
        return super().repr_int(x, level)


_SHORT_REPR = _ShortRepr()


def short_repr(value: Any, limit: int = 60) -> str:
    """repr() of a user's value cut to about `limit` characters, safe on any size or nesting."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def union_members(annotation: Any) -> list[Any]:
    """The alternatives of a union annotation (`int | None` -> [int, NoneType])."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return union_members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [leaf for arg in typing.get_args(annotation) for leaf in union_members(arg)]
    return [annotation]


def _bools_for_numbers(annotation: Any, value: Any) -> list[tuple[tuple[int, ...], str]]:
    """(where, message) for each bool in `value` where `annotation` expects a number; `where`
    is the index path inside a list or tuple value, () for the value itself."""
    leaves = union_members(annotation)
    if isinstance(value, bool):
        word = "true" if value else "false"
        if bool in leaves or Any in leaves:
            return []
        if float in leaves:
            return [((), f"expected a number, got {word}")]
        if int in leaves:
            return [((), f"expected an integer, got {word}")]
        return []
    containers = [leaf for leaf in leaves if typing.get_origin(leaf) in (list, tuple)]
    if not isinstance(value, (list, tuple)) or len(containers) != 1:
        return []
    args = typing.get_args(containers[0])
    variadic = typing.get_origin(containers[0]) is list or (len(args) == 2 and args[1] is ...)
    found = []
    for i, item in enumerate(value if variadic else value[: len(args)]):
        inner = _bools_for_numbers(args[0] if variadic else args[i], item)
        found += [((i, *where), msg) for where, msg in inner]
    return found


class Section(BaseModel):
    """A config section: unknown keys are errors, values are frozen, docstrings document keys."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False
    )

    @model_validator(mode="wrap")
    @classmethod
    def _no_bool_for_number(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        # pydantic's lax mode reads `true` as 1 and `false` as 0; in a config that is a typo.
        # (A model validator, not field_validator("*"): pydantic forbids before-validators on
        # the `kind` field of a discriminated union.)
        errors: list[InitErrorDetails] = []
        bad = set()
        for name, value in data.items() if isinstance(data, dict) else ():
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            for where, msg in _bools_for_numbers(field.annotation, value) if field else ():
                bad.add(name)
                error = PydanticCustomError("bool_for_number", msg)
                errors.append(InitErrorDetails(type=error, loc=(name, *where), input=value))
        if not bad:
            return handler(data)
        try:
            handler({k: v for k, v in data.items() if k not in bad})
        except ValidationError as err:
            # Report the other fields' problems too, but not the section-level ones: those may
            # only follow from the fields left out.
            errors += [
                InitErrorDetails(
                    type=PydanticCustomError(e["type"], e["msg"]), loc=e["loc"], input=e["input"]
                )
                for e in err.errors()
                if e["loc"] and e["loc"][0] not in bad
            ]
        raise ValidationError.from_exception_data(cls.__name__, errors)
