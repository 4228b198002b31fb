"""kiln: a config-driven training engine for transformer language models.

The engine (and torch) load on first use of `Trainer`, `Callback`, ..., so `kiln config`
commands start fast.
"""

from __future__ import annotations

from kiln.config import ConfigError, RunConfig, load_config
from kiln.errors import DataError, KilnError, ModelError
from kiln.registry import lazy_exports

__all__ = [
    "Callback",
    "ConfigError",
    "DataError",
    "Event",
    "KilnError",
    "ModelError",
    "RunConfig",
    "StopRequest",
    "TrainResult",
    "TrainState",
    "Trainer",
    "build_trainer",
    "grad_norm",
    "load_checkpoint",
    "load_config",
    "lr_scheduler",
    "memory_stats",
    "perplexity",
    "train",
]

__version__ = "0.2.0"

_LAZY = {
    "Callback": "kiln.callbacks.base",
    "Event": "kiln.engine.events",
    "StopRequest": "kiln.engine.control",
    "TrainResult": "kiln.engine.result",
    "TrainState": "kiln.engine.state",
    "Trainer": "kiln.engine.trainer",
    "build_trainer": "kiln.job",
    "grad_norm": "kiln.helpers",
    "load_checkpoint": "kiln.helpers",
    "lr_scheduler": "kiln.helpers",
    "memory_stats": "kiln.helpers",
    "perplexity": "kiln.helpers",
    "train": "kiln.job",
}


__getattr__ = lazy_exports(__name__, _LAZY)
