"""aroma-jax: AROMA (Autonomous Rank-One Matrix Adaptation) for JAX/Flax.

Adapters grow each adapted weight's update one rank-one matrix at a time and stop by
themselves, per module, when more rank stops paying (EMNLP 2025).
"""

from aroma_jax.adapters import AdapterState, Frozen, ModuleSpec, Pair
from aroma_jax.config import AromaConfig, ConfigError, aroma_without_reset, lora, relora
from aroma_jax.history import History
from aroma_jax.train_step import AromaTrainer, StepInfo, TrainState

__version__ = "0.1.0"

__all__ = [
    "AdapterState",
    "AromaConfig",
    "AromaTrainer",
    "ConfigError",
    "Frozen",
    "History",
    "ModuleSpec",
    "Pair",
    "StepInfo",
    "TrainState",
    "aroma_without_reset",
    "lora",
    "relora",
]
