"""The base of every config section, and the error a bad config raises."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from kiln.errors import KilnError

__all__ = ["ConfigError", "Section"]


class ConfigError(KilnError):
    """A config that cannot be used; `problems` holds one line per problem, each naming a key."""


class Section(BaseModel):
    """A config section: unknown keys are errors, values are frozen, docstrings document keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
