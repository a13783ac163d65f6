"""Atomic, verified, resumable checkpoints of the whole training state with orbax.

A checkpoint holds the `TrainState` (base params with folded kernels, heads, adapters, optimizer
state, controller state with its PRNG key, dropout key) and a JSON ``meta`` dict from the caller
(data position, history, step, resolved config: opaque here, returned as saved). Orbax writes
each step into ``<step>.orbax-checkpoint-tmp`` and renames it when complete, so a crash mid-save
leaves the previous checkpoint intact (stale temporary directories are ignored, and removed when
a manager is next opened); the ``keep`` latest are kept.

The state is stored as a flat dict of arrays (``leaf_00000``, ...) in the traversal order of the
target's pytree: module paths contain "/" and PRNG keys are typed arrays, neither of which a tree
of names would survive (keys are stored as `jax.random.key_data`). A third item, ``integrity``,
records every leaf's tree path, shape, dtype and a position-weighted 2x32-bit fingerprint of its
bits (any single flipped bit changes it; orbax does not notice flipped payload bytes by itself).
Restoring needs a target state (a fresh ``trainer.init``, possibly sharded), whose shardings are
used, so a state saved on one mesh restores onto another; the restored state is then checked
against the fingerprints.

Example:
    >>> # mgr = CheckpointManager("run/checkpoints", keep=2, save_every=100)
    >>> # mgr.save(step, state, {"data": {"epoch": 0, "index": 640}, "history": h.as_dict()})
    >>> # state, meta = mgr.restore(trainer.init(params))  # latest readable checkpoint
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax

Array = jax.Array
FORMAT = 1  # the layout of the integrity record


class CheckpointError(RuntimeError):
    """A checkpoint directory or step is unusable; the message names it and what is wrong."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint does not fit the target state (another model or config)."""


class CheckpointWarning(RuntimeWarning):
    """A damaged checkpoint was skipped in favour of an older one."""


# ------------------------------------------------------------------------------------ leaves
def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _plain(x: Any) -> Any:
    """A leaf as a plain array: typed PRNG keys become their ``uint32`` key data."""
    return jax.random.key_data(x) if _is_key(x) else x


def _flat(state: Any) -> dict[str, Any]:
    return {f"leaf_{i:05d}": _plain(x) for i, x in enumerate(jax.tree.leaves(state))}


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    x = _plain(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _describe(state: Any) -> list[dict]:
    """Per leaf: tree path, shape and dtype of the stored (plain) array."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        a = _abstract(x)
        out.append(
            {"path": jax.tree_util.keystr(path), "shape": list(a.shape), "dtype": str(a.dtype)}
        )
    return out


def _bits(x: Array) -> Array:
    """The bits of ``x`` as ``uint32`` (one per element; 64-bit types give a trailing 2)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = jnp.dtype(x.dtype).itemsize
    if width == 8:
        return lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _fingerprint_leaf(x: Array) -> Array:
    """(2,) uint32: ``sum(bits * (2i + 1))`` and a mixed-bits sum, both mod 2**32.

    The first changes under any single flipped bit (an odd multiplier); the second makes
    compensating multi-bit changes unlikely. Integer sums do not depend on the reduction order,
    so the value is the same for any sharding of ``x``.
    """
    u = _bits(x)
    idx = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(u.ndim)):
        idx = idx + lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
        stride *= u.shape[d]
    h1 = jnp.sum(u * (2 * idx + 1), dtype=jnp.uint32)
    z = u ^ (idx * jnp.uint32(0x9E3779B9))
    z = (z ^ (z >> 16)) * jnp.uint32(0x85EBCA6B)
    z = (z ^ (z >> 13)) * jnp.uint32(0xC2B2AE35)
    h2 = jnp.sum(z ^ (z >> 16), dtype=jnp.uint32)
    return jnp.stack([h1, h2])


_fingerprints_jit = jax.jit(lambda leaves: [_fingerprint_leaf(x) for x in leaves])


def fingerprints(state: Any) -> list[list[int]]:
    """Per leaf of ``state`` (keys by their data), its 2x32-bit fingerprint (one device pass)."""
    leaves = [_plain(x) for x in jax.tree.leaves(state)]
    from aroma_jax.core.sharding import to_host  # fingerprints of arrays spread over processes

    return [[int(v) for v in np.asarray(f)] for f in to_host(_fingerprints_jit(leaves))]


# ------------------------------------------------------------------------------ atomic files
def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes ``text`` so that readers see the old or the new file, never half of one.

    The text goes to a temporary file in the same directory, is flushed to disk, and replaces
    ``path`` with `os.replace` (atomic on POSIX and Windows); the temporary file is removed on
    failure. A new file gets mode 0o644, a replaced one keeps its mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644  # mkstemp would give 0o600
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (POSIX); best effort elsewhere
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def save_summary_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically (see `write_text_atomic`).

    The object is serialised before anything is written, so a value JSON cannot hold raises
    ``TypeError`` and leaves the old file untouched.
    """
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def _os_error(err: BaseException) -> OSError | None:
    """The `OSError` behind ``err`` (itself, or in its cause/context chain), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def staged_export(final: str | Path, last: str):
    """Yields an empty directory beside ``final`` to write an export into; on success its files
    move into ``final`` so that no reader ever finds a half-written set.

    ``last`` is the file a loader opens first (``adapter_config.json`` for PEFT, ``config.json``
    for ``from_pretrained``): an old copy is removed before anything moves and the new one moves
    in last, each move an atomic rename. On any error the staging directory is removed, and
    ``final`` keeps its old files (a failure while moving leaves it without ``last``, which no
    loader accepts). Other files already in ``final`` stay.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir())
        for f in stage.rglob("*"):  # durable before they become visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        final.mkdir(exist_ok=True)
        (final / last).unlink(missing_ok=True)
        for name in sorted(names, key=lambda n: n == last):
            if (stage / name).is_dir() and (final / name).is_dir():
                shutil.rmtree(final / name)
            os.replace(stage / name, final / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ----------------------------------------------------------------------------------- manager
def _join(thread: threading.Thread, deadline: float) -> None:
    """Joins ``thread`` by ``deadline``. `threading.enumerate` also lists a thread whose
    ``start()`` has not returned yet, and joining that one raises ``RuntimeError``, so wait for
    it to start first."""
    while True:
        try:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
            return
        except RuntimeError:  # created but not yet started
            if time.monotonic() >= deadline:
                return
            time.sleep(0.001)


class CheckpointManager:
    """Saves every ``save_every`` steps (or when forced, e.g. after outer steps), keeps ``keep``.

    Args:
      directory: where the step directories go; created if missing. An unwritable location
        raises `CheckpointError` naming it.
      keep: how many of the latest checkpoints to keep.
      save_every: `save` writes only at multiples of this step (unless forced).
    """

    def __init__(self, directory: str | Path, keep: int = 2, save_every: int = 100):
        if keep < 1 or save_every < 1:
            raise ValueError(f"keep and save_every must be >= 1, got {keep} and {save_every}")
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.save_every = save_every
        self._damaged: set[int] = set()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".write-test-{jax.process_index()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise CheckpointError(self._os_message("cannot write checkpoints to", err)) from err
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,
            ),
        )
        # Orbax removes stale temporary directories in the background; finish that now.
        getattr(self._mgr, "_maybe_await_cleanup_tmp_directory", lambda: None)()

    def _os_message(self, what: str, err: OSError) -> str:
        reason = err.strerror or str(err)
        reason = reason[:1].lower() + reason[1:]
        other = err.filename and str(err.filename) != str(self.directory)
        where = f" ({err.filename})" if other else ""
        return f"{what} {str(self.directory)!r}: {reason}{where}"

    # ------------------------------------------------------------------------------ listing
    def all_steps(self) -> list[int]:
        """The steps with a finished checkpoint, ascending (temporary directories excluded)."""
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # --------------------------------------------------------------------------------- save
    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        """Writes ``state`` and ``meta`` as checkpoint ``step``; returns whether it wrote.

        Writes only when ``step % save_every == 0`` or ``force``, and skips a step that already
        holds a good checkpoint (the same step's state is the same state). A step found damaged
        by `restore` is replaced. Returns after the checkpoint is complete on disk.
        """
        step = int(step)
        if not force and step % self.save_every:
            return False
        if step in self.all_steps():
            if step not in self._damaged:
                return False
            self._mgr.delete(step)
        try:
            meta = json.loads(json.dumps(meta))
        except (TypeError, ValueError) as err:
            raise TypeError(f"checkpoint meta must be JSON-serialisable: {err}") from err
        integrity = {
            "format": FORMAT,
            "step": step,
            "leaves": _describe(state),
            "fingerprints": fingerprints(state),
        }
        before = set(threading.enumerate())
        try:
            self._mgr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_flat(state)),
                    meta=ocp.args.JsonSave(meta),
                    integrity=ocp.args.JsonSave(integrity),
                ),
                force=True,
            )
            self._mgr.wait_until_finished()
        except Exception as err:  # a full or failing disk, from any of orbax's writers
            self._abandon(step, before)
            cause = _os_error(err)
            what = f"saving checkpoint step {step} failed in"
            if cause is not None:
                message = self._os_message(what, cause)
            else:
                message = f"{what} {str(self.directory)!r}: {type(err).__name__}: {err}"
            previous = [s for s in self.all_steps() if s != step]
            kept = f"step {previous[-1]}" if previous else "none yet"
            raise CheckpointError(f"{message}; the previous checkpoint is intact ({kept})") from err
        self._damaged.discard(step)
        return True

    def _abandon(self, step: int, before: set) -> None:
        """After a failed save: let the writer threads it started finish (a thread still writing
        at interpreter exit prints a traceback) and remove its temporary directory."""
        deadline = time.monotonic() + 60
        for thread in set(threading.enumerate()) - before - {threading.current_thread()}:
            _join(thread, deadline)
        for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------------------ restore
    def _check_layout(self, step: int, saved: list[dict], target: Any) -> None:
        want = _describe(target)
        where = f"checkpoint step {step} in {str(self.directory)!r}"
        if len(saved) != len(want):
            raise CheckpointMismatchError(
                f"{where} holds {len(saved)} arrays but the target state has {len(want)}: was it "
                "written for another model, target_modules or config?"
            )
        for s, w in zip(saved, want, strict=True):
            if s != w:
                raise CheckpointMismatchError(
                    f"{where} does not fit the target state: saved {s['path']} "
                    f"{s['dtype']}{s['shape']}, target {w['path']} {w['dtype']}{w['shape']}"
                )

    def _restore_step(self, step: int, target: Any) -> tuple[Any, dict]:
        integrity = self._mgr.restore(
            step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore())
        )["integrity"]
        if not isinstance(integrity, dict) or integrity.get("format") != FORMAT:
            raise ValueError(f"integrity record missing or of an unknown format: {integrity!r}")
        self._check_layout(step, integrity["leaves"], target)
        leaves, treedef = jax.tree.flatten(target)
        abstract = {f"leaf_{i:05d}": _abstract(x) for i, x in enumerate(leaves)}
        restored = self._mgr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        flat = [restored["state"][f"leaf_{i:05d}"] for i in range(len(leaves))]
        got = fingerprints(flat)
        bad = [
            integrity["leaves"][i]["path"]
            for i, (g, w) in enumerate(zip(got, integrity["fingerprints"], strict=True))
            if g != w
        ]
        if bad:
            raise ValueError(f"contents differ from their fingerprints in {bad[:5]}")
        out = [
            jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x
            for x, t in zip(flat, leaves, strict=True)
        ]
        meta = restored["meta"]
        if not isinstance(meta, dict):
            raise ValueError(f"meta is not a JSON object: {meta!r}")
        return jax.tree.unflatten(treedef, out), meta

    def restore(self, target_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, meta) of ``step``, or of the latest checkpoint that reads back whole.

        ``target_state`` is a state of the same structure (a fresh ``trainer.init``, possibly
        sharded); the result takes its dtypes and shardings. A damaged latest checkpoint is
        skipped with a `CheckpointWarning` (an older one restores); a damaged explicit ``step``
        raises `CheckpointError`; a checkpoint of another structure raises
        `CheckpointMismatchError`.
        """
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {str(self.directory)!r}")
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"no checkpoint for step {step} in {str(self.directory)!r}; "
                    f"steps there: {steps}"
                )
            try:
                return self._restore_step(step, target_state)
            except CheckpointMismatchError:
                raise
            except Exception as err:  # orbax and tensorstore raise many types for bad files
                self._damaged.add(step)
                raise CheckpointError(
                    f"checkpoint step {step} in {str(self.directory)!r} is damaged or "
                    f"incomplete: {type(err).__name__}: {err}"
                ) from err
        errors = []
        for s in reversed(steps):
            try:
                return self._restore_step(s, target_state)
            except CheckpointMismatchError:
                raise
            except Exception as err:
                self._damaged.add(s)
                why = f"{type(err).__name__}: {err}"
                warnings.warn(
                    f"checkpoint step {s} in {str(self.directory)!r} is damaged or incomplete "
                    f"({why}); trying an older one",
                    CheckpointWarning,
                    stacklevel=2,
                )
                errors.append(f"step {s}: {why}")
        raise CheckpointError(
            f"no readable checkpoint in {str(self.directory)!r}: " + "; ".join(errors)
        )

    def close(self) -> None:
        """Releases orbax's resources (waits for any write in flight)."""
        self._mgr.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def arrays_equal(a: Any, b: Any) -> bool:
    """Bit-identical pytrees of the same structure (keys compared by their data)."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(_plain(x)), np.asarray(_plain(y))
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointWarning",
    "arrays_equal",
    "fingerprints",
    "save_summary_atomic",
    "staged_export",
    "write_text_atomic",
]
