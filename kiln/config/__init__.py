"""Typed run configuration: pydantic models per section, YAML I/O, dotted overrides, presets.

A run is described by one YAML file. `load_config` reads it, lays it over a preset (when the file
names one), applies `key=value` overrides, validates everything at once and returns a frozen
`RunConfig`. Every problem is reported as one line naming its key path (`ConfigError.problems`).

From Python (docs/python.md): `RunConfig(preset=..., train={...})` builds one (the model and
data may then be given to the Trainer instead), `cfg.replace("train.batch_size=32")` or
`cfg.replace(**{"train.batch_size": 32})` makes a validated edited copy, and
`to_yaml`/`from_yaml` write and read it.

One module per group of sections (`model`, `data`, `train`, `eval`, `tracking`); `run` holds
`RunConfig`, the cross-section checks, presets and the YAML loading.
"""

from kiln.config import run as _run
from kiln.config.base import ConfigError, FrozenConfigError, Section
from kiln.config.data import DataConfig, InstructionTemplate
from kiln.config.eval import CheckpointConfig, EvalConfig, ExportConfig
from kiln.config.model import LoraConfig, ModelConfig, TokenizerConfig
from kiln.config.run import *  # noqa: F403  (exactly kiln.config.run.__all__)
from kiln.config.tracking import LogConfig, NotifyConfig
from kiln.config.train import OptimConfig, TrainConfig

__all__ = [
    "CheckpointConfig",
    "ExportConfig",
    "ConfigError",
    "DataConfig",
    "FrozenConfigError",
    "EvalConfig",
    "InstructionTemplate",
    "LogConfig",
    "LoraConfig",
    "ModelConfig",
    "NotifyConfig",
    "OptimConfig",
    "Section",
    "TokenizerConfig",
    "TrainConfig",
    *_run.__all__,
]
