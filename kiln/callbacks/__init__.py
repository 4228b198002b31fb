"""Callbacks: observers of the training loop."""

from kiln.callbacks.base import Callback
from kiln.callbacks.defaults import default_callbacks
from kiln.callbacks.progress import ProgressCallback

__all__ = ["Callback", "ProgressCallback", "default_callbacks"]
