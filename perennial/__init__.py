"""Perennial: continual retraining of language models without forgetting."""

from perennial.env import apply_offline_defaults

apply_offline_defaults()

__version__ = "0.1.0"
