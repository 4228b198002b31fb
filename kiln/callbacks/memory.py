"""`KeepFreedMemory`: what `kiln train` asks of glibc's allocator once a run is set up."""

from __future__ import annotations

from typing import Any

from kiln.callbacks.base import Callback

__all__ = ["KeepFreedMemory"]


class KeepFreedMemory(Callback):
    """Once setup is done (data, tokenizer, model), the memory setup freed goes back to the OS,
    and from then on what a step frees is kept for the next step instead of being handed back
    and faulted in again (`kiln.process.keep_freed_memory`: 39k page faults a step on the
    quickstart model without it). `kiln train` adds it for the process it owns; add it to a
    `Trainer` of your own to do the same in yours."""

    def on_train_begin(self, run: Any) -> None:
        from kiln.process import keep_freed_memory

        keep_freed_memory()
