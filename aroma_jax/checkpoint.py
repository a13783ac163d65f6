"""Atomic, resumable checkpoints of the whole training state with orbax.

A checkpoint holds the `TrainState` (base params with folded kernels, heads, adapters, optimizer
state, controller state with its PRNG key, dropout key) and a JSON ``meta`` dict from the caller
(data position, history, config). Orbax writes each step into a temporary directory and renames
it when complete, so a crash mid-save leaves the previous checkpoint intact; the ``keep`` latest
are kept.

The state is stored as a flat list of arrays (``leaf_00000``, ...) in the traversal order of
the target's pytree: module paths contain "/" and PRNG keys are typed arrays, neither of which a
tree of names would survive. Restoring needs a target state (a fresh ``trainer.init``), whose
shardings are used, so a state saved on one mesh restores onto another.

Example:
    >>> # mgr = CheckpointManager("run/checkpoints", keep=2, save_every=100)
    >>> # mgr.save(step, state, {"data": {"step": step}}); state, meta = mgr.restore(fresh)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint directory is unusable; the message names it and what is wrong."""


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_flat(state: Any) -> dict[str, Any]:
    leaves = jax.tree.leaves(state)
    return {
        f"leaf_{i:05d}": (jax.random.key_data(x) if _is_key(x) else x) for i, x in enumerate(leaves)
    }


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    if _is_key(x):
        x = jax.random.key_data(x)
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _from_flat(flat: dict[str, Any], target: Any) -> Any:
    leaves, treedef = jax.tree.flatten(target)
    out = []
    for i, t in enumerate(leaves):
        x = flat[f"leaf_{i:05d}"]
        out.append(jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x)
    return jax.tree.unflatten(treedef, out)


class CheckpointManager:
    """Saves every ``save_every`` steps (or when forced, e.g. after outer steps), keeps ``keep``."""

    def __init__(self, directory: str | Path, keep: int = 2, save_every: int = 100):
        self.directory = Path(directory).absolute()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise CheckpointError(
                f"cannot write checkpoints to {str(self.directory)!r}: "
                f"{err.strerror or err}; choose a writable output directory"
            ) from err
        self.save_every = save_every
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False
            ),
        )

    def all_steps(self) -> list[int]:
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        """Saves unless the step is off the ``save_every`` grid (and not forced) or saved."""
        if not force and step % self.save_every:
            return False
        if step in self.all_steps():
            return False
        self._mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_flat(state)), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self._mgr.wait_until_finished()
        return True

    def _restore_step(self, step: int, target: Any) -> tuple[Any, dict]:
        abstract = {f"leaf_{i:05d}": _abstract(x) for i, x in enumerate(jax.tree.leaves(target))}
        restored = self._mgr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return _from_flat(restored["state"], target), dict(restored["meta"])

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, meta) of ``step``, or of the latest checkpoint that reads back whole.

        A damaged latest checkpoint is skipped with a warning (the previous one restores); an
        explicitly requested damaged step raises `CheckpointError`.
        """
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {str(self.directory)!r}")
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"no checkpoint for step {step} in "
                    f"{str(self.directory)!r}; steps there: {steps}"
                )
            try:
                return self._restore_step(step, target)
            except Exception as err:  # orbax raises many types for damaged files
                raise CheckpointError(
                    f"checkpoint step {step} in {str(self.directory)!r} is "
                    f"damaged or incomplete: {err}"
                ) from err
        errors = []
        for s in reversed(steps):
            try:
                return self._restore_step(s, target)
            except Exception as err:
                log.warning(
                    "checkpoint step %d in %s is unreadable (%s); trying an older one",
                    s,
                    self.directory,
                    err,
                )
                errors.append(f"step {s}: {err}")
        raise CheckpointError(f"no readable checkpoint in {str(self.directory)!r}: {errors}")


def arrays_equal(a: Any, b: Any) -> bool:
    """Bit-identical pytrees (keys compared by their data)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb, strict=True):
        x = jax.random.key_data(x) if _is_key(x) else x
        y = jax.random.key_data(y) if _is_key(y) else y
        if not np.array_equal(np.asarray(x), np.asarray(y)):
            return False
    return True


__all__ = ["CheckpointError", "CheckpointManager", "arrays_equal"]
