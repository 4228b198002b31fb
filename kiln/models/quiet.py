"""Keep third-party noise out of kiln's output where kiln itself makes the call.

The CLI turns transformers' progress bars and info logging off for the whole command
(`QUIET_HF` in `kiln.cli`); the Python API leaves the user's own settings alone and is quiet only
around what kiln calls on the user's behalf: writing final/ and merging LoRA adapters.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["no_hf_progress", "peft_quietly"]


@contextmanager
def peft_quietly() -> Iterator[None]:
    """Build a PEFT model without transformers' FutureWarning about `is_gradient_checkpointing`:
    peft's `PeftModel.__init__` reads that deprecated property, so the warning came on every
    LoRA run and merge while nothing the user wrote can avoid it. Other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


@contextmanager
def no_hf_progress() -> Iterator[None]:
    """transformers' progress bars ("Writing model shards", "Loading weights") off for the
    block, then back as they were."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
