"""The base of every config section, the error a bad config raises, and shared bounds.

Every section refuses inf and nan in float fields and `true`/`false` in number fields, so a
section added later gets both without asking. The bounds below are far beyond any real run;
they exist so that a typo (an extra zero run wild, `1e12`) is an error at validation instead
of a terabyte allocation, an int64 overflow or a timer that cannot be armed.
"""

from __future__ import annotations

import copy
import math
import reprlib
import types
import typing
from collections.abc import Mapping
from typing import Any, Self

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
    "ALTERNATIVES",
    "MAX_BATCH",
    "MAX_COUNT",
    "MAX_SECONDS",
    "MAX_TOKENS",
    "SECTION_PATHS",
    "ConfigError",
    "FrozenConfigError",
    "Section",
    "drop_alternative",
    "format_errors",
    "set_dotted",
    "short_repr",
    "split_override",
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


class FrozenConfigError(AttributeError):
    """An attribute of a config was assigned: configs are immutable; the message says how to
    make an edited copy (`replace`)."""


SECTION_PATHS: dict[type, str] = {}
"""Where each section class sits in a RunConfig (`TrainConfig` -> `train`), for the classes
that sit in exactly one place; filled by kiln.config.run. Messages use it to name full keys."""


ALTERNATIVES = {
    "optim.warmup_steps": "optim.warmup_ratio",
    "optim.warmup_ratio": "optim.warmup_steps",
    "model.name_or_path": "model.arch",
    "model.arch": "model.name_or_path",
}
"""Keys that say the same thing two ways, or exclude each other (a pretrained model or one
built from scratch): setting one (not to null) in a later layer (an override, an edit, a file
over its preset) drops the other from the earlier one."""


def drop_alternative(node: dict[str, Any], path: str, value: Any) -> None:
    """After `node[leaf of path] = value`: remove the key `path` is an alternative to."""
    other = ALTERNATIVES.get(path)
    if other is not None and value is not None:
        node.pop(other.rpartition(".")[2], None)


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


def _cut(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters: a key or override echoed back may be arbitrarily long."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_errors(err: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem of a pydantic error, each naming its key path (under `prefix`, the
    path of the section validated, e.g. `train`)."""
    lines = []
    for e in err.errors():
        loc = ".".join(_cut(str(p)) for p in ([prefix] if prefix else []) + list(e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            from kiln.config.suggest import did_you_mean  # it reads RunConfig's key tree

            lines.append(f"{loc}: unknown key{did_you_mean(loc)}")
        elif e["type"] == "missing":
            lines.append(f"{loc}: required key is missing")
        elif e["type"] == "bool_for_number":  # from Section: the message says it all
            lines.append(f"{loc}: {msg}")
        elif e["type"] == "invalid_key":  # YAML `1:`, `null:` or `true:` as a key
            where = [prefix] if prefix else []
            parent = ".".join(_cut(str(p)) for p in where + list(e["loc"][:-1])) or "top level"
            lines.append(f"{parent}: key {_cut(str(e['loc'][-1]))} is not a string")
        elif e["type"] == "value_error" and not e["loc"]:
            # A section's own check: its message names the full keys already.
            lines.extend(msg.splitlines())
        elif e["type"] == "value_error":
            lines.extend(m if m.startswith(loc) else f"{loc}: {m}" for m in msg.splitlines())
        else:
            lines.append(f"{loc}: {msg[:1].lower() + msg[1:]} (got {short_repr(e['input'])})")
    return lines


def split_override(item: str) -> tuple[str, str] | str:
    """(key, value text) of a `a.b.c=value` override, or the problem with it."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        return f"{_cut(item)}: an override must look like section.key=value"
    return key, text


def set_dotted(node: dict[str, Any], key: str, value: Any, current: Any = None) -> str | None:
    """Set dotted `key` in a raw config dict, in place; None, or the problem. `current`: the
    config `node` was taken from, whose values fill the sections the key passes through. A
    section met on the way as an object becomes a dict of the fields it was given (validated
    again, its unset fields staying unset)."""
    parts = key.split(".")
    root = SECTION_PATHS.get(type(current), "") if isinstance(current, Section) else ""
    for i, part in enumerate(parts[:-1]):
        current = getattr(current, part, None) if isinstance(current, Section) else None
        if part not in node:
            node[part] = {} if current is None else current
        child = node[part]
        if isinstance(child, Section):
            child = {k: getattr(child, k) for k in child.model_fields_set}
        if isinstance(child, dict):
            child = node[part] = dict(child)  # never edit a dict the config holds
        else:
            return f"{'.'.join(parts[: i + 1])}: is a value, not a section"
        node = child
    node[parts[-1]] = value
    drop_alternative(node, f"{root}.{key}" if root else key, value)
    return None


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

    if not typing.TYPE_CHECKING:  # keep the field-typed __init__ type checkers synthesize

        def __init__(self, /, **data: Any) -> None:
            try:
                super().__init__(**data)
            except ValidationError as err:
                prefix = SECTION_PATHS.get(type(self), "")
                raise ConfigError(format_errors(err, prefix)) from None

        # As for BaseModel.__init__: validating a nested value never calls it, so only a
        # direct construction turns pydantic's error into kiln's one-line problems.
        __init__.__pydantic_base_init__ = True

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenConfigError(self._frozen_message(name, value))

    def __delattr__(self, name: str) -> None:
        raise FrozenConfigError(self._frozen_message(name, None))

    def _frozen_message(self, name: str, value: Any) -> str:
        cls = type(self).__name__
        path = SECTION_PATHS.get(type(self))
        if path is None and cls == "RunConfig":
            how = f"cfg.replace({name}={short_repr(value)})"
        elif path is None:
            how = f"section.replace({name}={short_repr(value)})"
        else:
            how = f"cfg.replace(**{{{path + '.' + name!r}: {short_repr(value)}}})"
        return f"{cls} is frozen (immutable): make an edited, validated copy with {how}"

    def replace(self, *overrides: str, **changes: Any) -> Self:
        """An edited copy, validated as a whole (cross-section checks included).

        Keys are dotted paths under this section; `overrides` are `key=value` strings, read as
        on the command line (`kiln train ... train.batch_size=32`), applied after the keywords.
        A section given whole (`train={...}`) replaces that section. The copy is new; `self`
        is unchanged. Example: `cfg.replace("optim.lr=1e-3", **{"train.batch_size": 32})`.

        Raises:
            ConfigError: one line per problem, each naming the full key path, as the CLI does.
        """
        from kiln.config.yamlio import parse_override_value

        raw: dict[str, Any] = {k: getattr(self, k) for k in self.model_fields_set}
        problems = []
        pairs = list(changes.items())
        for item in overrides:
            split = split_override(item)
            if isinstance(split, str):
                problems.append(split)
            else:
                pairs.append((split[0], parse_override_value(split[1])))
        for key, value in pairs:
            problem = set_dotted(raw, key, value, self)
            if problem:
                problems.append(problem)
        prefix = SECTION_PATHS.get(type(self), "")
        if problems:
            raise ConfigError([f"{prefix}.{p}" if prefix else p for p in problems])
        return self._edited(raw)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy with the `update`d fields, validated like `replace` (ConfigError on a bad
        value, instead of pydantic's unvalidated copy)."""
        if not update:
            new = super().model_copy()
        else:
            new = self._edited({**{k: getattr(self, k) for k in self.model_fields_set}, **update})
        return copy.deepcopy(new) if deep else new

    def _edited(self, raw: dict[str, Any]) -> Self:
        """`raw` validated into this section's class, as an edit of an existing config (a
        preset is not applied again: every value the config had stays)."""
        try:
            return type(self).model_validate(raw, context={"edit": True})
        except ValidationError as err:
            raise ConfigError(format_errors(err, SECTION_PATHS.get(type(self), ""))) from None
