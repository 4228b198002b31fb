"""Logging, tracking and notification sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kiln.config.base import Section

__all__ = ["LogConfig", "NotifyConfig"]


class LogConfig(Section):
    every_steps: int = Field(10, gt=0)
    """Log train loss, LR and throughput every N optimizer steps (the only host syncs)."""
    progress: Literal["auto", "bar", "plain", "none"] = "auto"
    """Progress display: a live bar on a TTY (auto), a plain line per log step, or nothing."""


class NotifyConfig(Section):
    on: list[Literal["start", "end", "failure"]] = Field(default_factory=list)
    """Events to notify about (senders land with the notifications issue)."""
