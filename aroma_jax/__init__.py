"""aroma-jax: AROMA (Autonomous Rank-One Matrix Adaptation) for JAX/Flax.

Adapters grow each adapted weight's update one rank-one matrix at a time and stop by
themselves, per module, when more rank stops paying (EMNLP 2025).

The package is layered (docs/ARCHITECTURE.md): ``core`` (the algorithm; imports nothing else of
ours) <- ``data`` (tasks, offline assets, objectives, scores) <- ``models`` (HF Flax loading, the
LLaMA fixes, GGUF conversion) <- ``train`` (run config, pipeline, runner, checkpoints, exports)
<- ``cli``/``demo``. The algorithm's modules are re-exported here, so
``from aroma_jax import AromaConfig, AromaTrainer, loop`` keeps working.
"""

from aroma_jax.core import (
    adapters,
    config,
    controller,
    history,
    inject,
    loop,
    methods,
    nnx_adapt,
    norms,
    optim,
    sharding,
    train_step,
)
from aroma_jax.core.adapters import AdapterState, Frozen, ModuleSpec, Pair
from aroma_jax.core.config import AromaConfig, ConfigError, aroma_without_reset, lora, relora
from aroma_jax.core.history import History
from aroma_jax.core.nnx_adapt import NnxTrainer
from aroma_jax.core.train_step import AromaTrainer, StepInfo, TrainState

__version__ = "0.1.0"

__all__ = [
    "AdapterState",
    "AromaConfig",
    "AromaTrainer",
    "ConfigError",
    "Frozen",
    "History",
    "ModuleSpec",
    "NnxTrainer",
    "Pair",
    "StepInfo",
    "TrainState",
    "adapters",
    "aroma_without_reset",
    "config",
    "controller",
    "history",
    "inject",
    "loop",
    "methods",
    "nnx_adapt",
    "norms",
    "optim",
    "sharding",
    "train_step",
    "lora",
    "relora",
]
