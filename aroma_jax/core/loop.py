"""A minimal host loop around `AromaTrainer.step` that never syncs per step.

Step infos stay on the device and are fetched in one transfer every ``sync_every`` steps, when
the loop also learns whether the controller has finished (all modules done, or ``max_steps``).
After ``finished`` the step is a no-op, so the few steps run before the loop notices change
nothing.

Example:
    >>> # state, history = run(trainer, state, batches, sync_every=20)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax

from aroma_jax.core.history import History
from aroma_jax.core.train_step import AromaTrainer, StepInfo, TrainState


def run(
    trainer: AromaTrainer,
    state: TrainState,
    batches: Iterable[Any],
    sync_every: int = 20,
    history: History | None = None,
    on_sync: Callable[[TrainState, list[StepInfo]], None] | None = None,
) -> tuple[TrainState, History]:
    """Steps through ``batches`` until they run out or the controller finishes."""
    history = history or History(trainer.paths)
    pending: list[StepInfo] = []
    for batch in batches:
        state, info = trainer.step(state, batch)
        pending.append(info)
        if len(pending) >= sync_every:
            done = _sync(state, pending, history, on_sync)
            pending = []
            if done:
                break
    if pending:
        _sync(state, pending, history, on_sync)
    return state, history


def _sync(state, pending, history, on_sync) -> bool:
    history.extend(pending)
    if on_sync is not None:
        on_sync(state, pending)
    return bool(jax.device_get(state.ctrl.finished))
