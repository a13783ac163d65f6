"""Checkpoints: bit-identical resume on the toy problem, damage handling, keep-K, atomic files."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aroma_jax.core.history import History
from aroma_jax.core.train_step import AromaTrainer, TrainState
from aroma_jax.examples.toy import make_problem, toy_config
from aroma_jax.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointWarning,
    arrays_equal,
    save_summary_atomic,
)

# Outer steps come every <= 40 steps and inner checks every 5, so the toy run below has outer
# steps at 40 and 65 and sticky inner-converged labels in between (asserted, not assumed).
CFG = toy_config(
    inner_check_every=5,
    inner_max_steps=40,
    inner_tol=0.1,
    learning_rate=2e-2,
    warmup_steps=5,
    rewarmup_steps=5,
    max_steps=1000,
)
N_STEPS = 80


def _problem():
    model, student, teacher = make_problem(0)

    def loss_fn(params, batch, rng):
        pred = model.apply({"params": params}, batch["x"])
        return jnp.mean(jnp.sum((pred - batch["y"]) ** 2, axis=-1))

    teach = jax.jit(lambda x: model.apply({"params": teacher}, x))

    def batch_at(index: int) -> dict:
        """The batch of a global step index: deterministic, independent of any resume."""
        x = jax.random.normal(jax.random.fold_in(jax.random.key(1), index), (32, 32))
        return {"x": x, "y": teach(x)}

    return loss_fn, student, batch_at


def _fresh(cfg=CFG):
    """A new trainer and ``init`` state from freshly built params (nothing shared in memory)."""
    loss_fn, student, batch_at = _problem()
    trainer = AromaTrainer(loss_fn, student, cfg)
    return trainer, trainer.init(student), batch_at


def _meta(history: History, index: int, step: int) -> dict:
    return {
        "data": {"epoch": 0, "index": index},
        "step": step,
        "history": history.as_dict(),
        "config": dataclasses.asdict(CFG),
    }


def _assert_states_identical(got: TrainState, want: TrainState) -> None:
    for part in TrainState._fields:
        a, b = getattr(got, part), getattr(want, part)
        la, ta = jax.tree_util.tree_flatten_with_path(a)
        lb, tb = jax.tree_util.tree_flatten_with_path(b)
        assert ta == tb, part
        for (path, x), (_, y) in zip(la, lb, strict=True):
            x = jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
            y = jax.random.key_data(y) if jnp.issubdtype(y.dtype, jax.dtypes.prng_key) else y
            assert x.dtype == y.dtype, (part, jax.tree_util.keystr(path))
            np.testing.assert_array_equal(
                np.asarray(x), np.asarray(y), err_msg=f"{part}{jax.tree_util.keystr(path)}"
            )


# ------------------------------------------------------------------- acceptance: resume
def test_resume_after_outer_step_and_mid_inner_loop_is_bit_identical(tmp_path):
    """One uninterrupted run checkpoints (a) right after its first outer step and (b) in the
    middle of the next inner loop; fresh trainers restore each and finish bit-identically."""
    trainer, state, batch_at = _fresh()
    history = History(trainer.paths)
    points: dict[str, int] = {}
    managers = {
        "a": CheckpointManager(tmp_path / "a", keep=2, save_every=1000),
        "b": CheckpointManager(tmp_path / "b", keep=2, save_every=1000),
    }
    # Which steps are outer steps is only known from the step infos, so the loop syncs every
    # step (cheap here) and saves at the two points, as the runner does after outer steps.
    for i in range(N_STEPS):
        state, info = trainer.step(state, batch_at(i))
        history.extend([info])
        step = i + 1
        outer = history.outer_step_numbers()
        if outer and step == outer[0]:  # (a) right after the first outer step
            points["a"] = step
            assert managers["a"].save(step, state, _meta(history, step, step), force=True)
        if outer and step == outer[0] + 17:  # (b) mid inner loop, between two inner checks
            points["b"] = step
            assert managers["b"].save(step, state, _meta(history, step, step), force=True)
    reference = state
    ref_history = history.as_dict()
    assert trainer.compiles == 1
    for m in managers.values():
        m.close()
    del trainer, state, managers

    outer_steps = sorted({r["step"] for r in ref_history["outer_steps"]})
    assert len(outer_steps) >= 2 and points["a"] == outer_steps[0]
    assert points["a"] < points["b"] < outer_steps[1]
    assert points["b"] % CFG.inner_check_every != 0  # between two inner checks

    for key in ("a", "b"):
        trainer, target, batch_at = _fresh()  # a new process would start exactly like this
        with CheckpointManager(tmp_path / key, keep=2, save_every=1000) as mgr:
            assert mgr.latest_step() == points[key]
            state, meta = mgr.restore(target)
        assert meta["step"] == points[key] and meta["data"] == {"epoch": 0, "index": points[key]}
        assert meta["config"] == json.loads(json.dumps(dataclasses.asdict(CFG)))
        assert int(state.ctrl.step) == points[key]
        if key == "b":  # mid inner loop: sticky labels and previous norms are live state
            assert any(bool(v) for v in state.ctrl.inner_conv.values())
            assert int(state.ctrl.inner_t) == points["b"] - points["a"]
        history = History(trainer.paths)
        history.inner_checks = list(meta["history"]["inner_checks"])
        history.outer_steps = list(meta["history"]["outer_steps"])
        for i in range(meta["data"]["index"], N_STEPS):
            state, info = trainer.step(state, batch_at(i))
            history.extend([info])
        assert trainer.compiles == 1  # the restored state has the step's exact avals
        _assert_states_identical(state, reference)
        assert history.as_dict() == ref_history
        del trainer, target, state


# ------------------------------------------------------------- damage, keep-K, errors
@pytest.fixture(scope="module")
def states() -> dict[int, TrainState]:
    """Distinct small states (different seeds) to tell checkpoints apart."""
    _, student, _ = _problem()
    trainer = AromaTrainer(lambda p, b, r: 0.0, student, CFG)
    return {step: trainer.init(student, seed=step) for step in (10, 20, 30, 40, 50)}


def _target(states):
    return states[10]


def _write(directory: Path, states, steps=(10, 20), keep=3) -> CheckpointManager:
    mgr = CheckpointManager(directory, keep=keep, save_every=10)
    for s in steps:
        assert mgr.save(s, states[s], {"data": {"index": s}})
    return mgr


def _flip_payload_byte(step_dir: Path) -> None:
    """One flipped bit in the largest array data file: orbax itself reads it back silently."""
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and "/d/" in str(f)]
    f = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    ["flipped_bit", "deleted_data_files", "deleted_state_item", "truncated_meta"],
)
def test_damaged_latest_falls_back_and_explicit_step_raises(tmp_path, states, damage):
    d = tmp_path / "ck"
    _write(d, states).close()
    latest = d / "20"
    if damage == "flipped_bit":
        _flip_payload_byte(latest)
    elif damage == "deleted_data_files":  # a partial step directory
        for f in (latest / "state").rglob("*"):
            if f.is_file() and "/d/" in str(f):
                f.unlink()
    elif damage == "deleted_state_item":
        shutil.rmtree(latest / "state")
    else:
        (latest / "meta" / "metadata").write_text('{"data": ')

    mgr = CheckpointManager(d, keep=3, save_every=10)
    assert mgr.latest_step() == 20
    with pytest.warns(CheckpointWarning, match=r"step 20 in .* is damaged or incomplete"):
        state, meta = mgr.restore(_target(states))
    assert meta == {"data": {"index": 10}} and arrays_equal(state, states[10])

    with pytest.raises(CheckpointError) as err:
        mgr.restore(_target(states), step=20)
    msg = str(err.value)
    assert str(d) in msg and "step 20" in msg and "damaged or incomplete" in msg
    if damage == "flipped_bit":  # caught by the fingerprints, not by orbax
        assert "differ from their fingerprints in" in msg and "kernel" in msg

    # Re-saving the damaged step (a resumed run reaching it again) replaces it.
    assert mgr.save(20, states[20], {"data": {"index": 20}})
    state, meta = mgr.restore(_target(states))
    assert meta == {"data": {"index": 20}} and arrays_equal(state, states[20])
    mgr.close()


def test_no_readable_checkpoint_names_every_step(tmp_path, states):
    d = tmp_path / "ck"
    _write(d, states).close()
    for s in (10, 20):
        shutil.rmtree(d / str(s) / "state")
    mgr = CheckpointManager(d)
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError) as err:
        mgr.restore(_target(states))
    assert str(d) in str(err.value) and "step 20" in str(err.value) and "step 10" in str(err.value)
    with pytest.raises(
        CheckpointError, match=r"no checkpoint for step 30 .* steps there: \[10, 20\]"
    ):
        mgr.restore(_target(states), step=30)
    mgr.close()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        CheckpointManager(tmp_path / "empty").restore(_target(states))


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, states, monkeypatch):
    """A save that fails after the arrays are written leaves the previous checkpoints only."""
    d = tmp_path / "ck"
    mgr = _write(d, states)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while writing the meta item")

    handler = ocp.handlers.JsonCheckpointHandler
    monkeypatch.setattr(handler, "async_save", boom, raising=False)
    monkeypatch.setattr(handler, "save", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        mgr.save(30, states[30], {"data": {"index": 30}})
    monkeypatch.undo()
    # written aside, never renamed, and removed once the failed save's writers have stopped
    # (a killed process leaves it: test_leftover_tmp_dir_is_ignored_and_cleaned)
    assert sorted(os.listdir(d)) == ["10", "20"]
    del mgr  # the crashed process

    mgr = CheckpointManager(d, keep=3, save_every=10)  # the next process
    assert mgr.all_steps() == [10, 20]
    assert sorted(os.listdir(d)) == ["10", "20"]  # the stale temporary directory is gone
    state, meta = mgr.restore(_target(states))
    assert meta == {"data": {"index": 20}} and arrays_equal(state, states[20])
    mgr.close()


def test_leftover_tmp_dir_is_ignored_and_cleaned(tmp_path, states):
    d = tmp_path / "ck"
    _write(d, states).close()
    tmp = d / "30.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(d / "20", tmp)
    (tmp / "commit_success.txt").unlink(missing_ok=True)
    mgr = CheckpointManager(d, keep=3, save_every=10)
    assert mgr.all_steps() == [10, 20] and mgr.latest_step() == 20
    assert not tmp.exists()  # removed when the manager opened the directory
    state, meta = mgr.restore(_target(states))
    assert meta == {"data": {"index": 20}} and arrays_equal(state, states[20])
    mgr.close()


def test_keep_k_save_every_and_repeated_steps(tmp_path, states):
    mgr = CheckpointManager(tmp_path / "ck", keep=2, save_every=20)
    assert not mgr.save(10, states[10], {})  # off the save_every grid
    assert mgr.save(10, states[10], {}, force=True)  # e.g. right after an outer step
    assert not mgr.save(10, states[20], {}, force=True)  # already saved
    assert mgr.save(20, states[20], {})
    assert not mgr.save(30, states[30], {})  # off the grid
    assert mgr.save(30, states[30], {"data": {"index": 30}}, force=True)
    assert mgr.save(40, states[40], {"data": {"index": 40}})
    assert mgr.all_steps() == [30, 40] and mgr.latest_step() == 40
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["30", "40"]
    state, meta = mgr.restore(_target(states), step=30)
    assert meta == {"data": {"index": 30}} and arrays_equal(state, states[30])
    with pytest.raises(TypeError, match="JSON-serialisable"):
        mgr.save(60, states[50], {"bad": object()})
    assert mgr.all_steps() == [30, 40]
    with pytest.raises(ValueError, match="keep and save_every"):
        CheckpointManager(tmp_path / "x", keep=0)
    mgr.close()


def test_restore_into_another_structure_raises_mismatch(tmp_path, states):
    d = tmp_path / "ck"
    _write(d, states, steps=(10,)).close()
    _, student, _ = _problem()
    other = AromaTrainer(lambda p, b, r: 0.0, student, CFG.replace(target_modules=("m0", "m1")))
    mgr = CheckpointManager(d)
    with pytest.raises(CheckpointMismatchError, match=r"step 10 .* holds \d+ arrays .* has \d+"):
        mgr.restore(other.init(student))
    wide = CFG.replace(rank_capacity=CFG.rank_capacity_derived * 2)
    other = AromaTrainer(lambda p, b, r: 0.0, student, wide)
    with pytest.raises(CheckpointMismatchError, match="does not fit the target state"):
        mgr.restore(other.init(student))
    mgr.close()


def test_unwritable_directory_error_names_the_path(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError) as err:
        CheckpointManager(blocker / "ckpt")
    msg = str(err.value)
    assert msg.startswith(f"cannot write checkpoints to {str(blocker / 'ckpt')!r}: "), msg
    assert "not a directory" in msg or "file exists" in msg

    if os.geteuid() == 0:  # root writes through permission bits; the case above covers it
        return
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(CheckpointError, match=r"cannot write checkpoints to .*: permission"):
            CheckpointManager(locked / "ckpt")
    finally:
        locked.chmod(0o700)


# -------------------------------------------------------------------------------- sharding
@pytest.mark.skipif(len(jax.devices()) < 6, reason="needs 6 (simulated) devices")
def test_saved_on_one_mesh_restores_onto_another(tmp_path, states):
    def place(state, mesh):
        def put(x):
            spec = P("x") if x.ndim >= 1 and x.shape[0] % mesh.size == 0 else P()
            return jax.device_put(x, NamedSharding(mesh, spec))

        return jax.tree.map(put, state)

    mesh4 = Mesh(np.array(jax.devices()[:4]), ("x",))
    mesh2 = Mesh(np.array(jax.devices()[4:6]), ("x",))
    saved = place(states[20], mesh4)
    target = place(states[10], mesh2)
    with CheckpointManager(tmp_path / "ck") as mgr:
        mgr.save(20, saved, {"mesh": 4}, force=True)
        state, meta = mgr.restore(target)
    assert meta == {"mesh": 4} and arrays_equal(state, states[20])
    for x, t in zip(jax.tree.leaves(state), jax.tree.leaves(target), strict=True):
        assert x.sharding == t.sharding
    kernel = state.base["m1"]["kernel"]
    assert kernel.sharding.mesh == mesh2 and kernel.sharding.spec == P("x")


# ---------------------------------------------------------------------------- atomic files
def test_save_summary_atomic(tmp_path, monkeypatch):
    path = tmp_path / "run" / "summary.json"
    save_summary_atomic(path, {"status": "finished", "ranks": {"m1": 1}})
    assert json.loads(path.read_text()) == {"status": "finished", "ranks": {"m1": 1}}
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
    with pytest.raises(TypeError):
        save_summary_atomic(path, {"bad": object()})
    assert json.loads(path.read_text())["status"] == "finished"

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_summary_atomic(path, {"status": "interrupted"})
    monkeypatch.undo()
    assert json.loads(path.read_text())["status"] == "finished"
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]  # no temporary left
