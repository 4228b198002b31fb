"""kiln: a config-driven training engine for transformer language models.

The engine (and torch) load on first use of `Trainer`, `Callback`, ..., so `kiln config`
commands start fast; the config (pydantic) on first use of `load_config`, `RunConfig`, so the
`kiln` command installs its signal handlers before any heavy import (`kiln.cli`).
"""

from __future__ import annotations

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
    "ConfigError": "kiln.config",
    "RunConfig": "kiln.config",
    "load_config": "kiln.config",
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
