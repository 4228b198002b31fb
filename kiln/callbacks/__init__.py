"""Callbacks: observers of the training loop.

Loaded lazily: the engine imports `kiln.callbacks.base` (the Callback interface) and nothing
else of this package, so `import kiln.callbacks.base` loads no callback (tests/test_layering.py).
"""

from __future__ import annotations

from kiln.registry import lazy_exports

__all__ = ["Callback", "KeepFreedMemory", "ProgressCallback", "default_callbacks"]

_LAZY = {
    "Callback": "kiln.callbacks.base",
    "KeepFreedMemory": "kiln.callbacks.memory",
    "ProgressCallback": "kiln.callbacks.progress",
    "default_callbacks": "kiln.callbacks.defaults",
}


__getattr__ = lazy_exports(__name__, _LAZY)
