"""The training engine: the loop, its state and its events."""

from kiln.engine.events import Event
from kiln.engine.state import TrainState
from kiln.engine.trainer import Trainer, TrainResult, seed_everything

__all__ = ["Event", "TrainResult", "TrainState", "Trainer", "seed_everything"]
