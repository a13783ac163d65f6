"""Faults while writing: SIGKILL inside a checkpoint save, a full or failing disk under the
checkpoint writer, the exports and summary.json.

One uninterrupted reference run (module fixture) is compared with runs that were killed or hit
a disk error and were then resumed: the final adapters and metrics.jsonl must be identical.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from aroma_jax.train import checkpoint, run_config, runner
from aroma_jax.train.checkpoint import CheckpointError, CheckpointManager, staged_export

OVERRIDES = [
    "model.name=tiny-roberta",
    "task.max_train_examples=64",
    "task.max_eval_examples=16",
    "train.batch_size=8",
    "train.log_every=2",
    "train.save_every=4",
    "train.eval_every=100",
    "train.eval_at_start=false",
    "train.progress=false",
    "aroma.max_steps=12",
    "aroma.inner_max_steps=4",
    "aroma.inner_check_every=2",
    "aroma.outer_tol=1e-4",
    "optimizer.warmup_steps=1",
    "aroma.rewarmup_steps=1",
]
KILL_STEP = 8
JSON_HANDLER = "orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler"

# Runs the config above and SIGKILLs itself inside the save of step KILL_STEP, at argv[2]:
# mid-write (arrays written, JSON items not), before-rename (all written, not yet renamed
# into place), after-rename (renamed, orbax's bookkeeping after it not done).
DRILL = """
import json, os, signal, sys
from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh
from orbax.checkpoint._src.path import async_path
from aroma_jax.train import checkpoint, run_config, runner

out, point, kill_step, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
armed = [False]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
save = checkpoint.CheckpointManager.save
def armed_save(self, step, state, meta, force=False):
    armed[0] = int(step) == kill_step
    return save(self, step, state, meta, force)
checkpoint.CheckpointManager.save = armed_save
save_fn, rename = jh.JsonCheckpointHandler._save_fn, async_path.rename
def json_save(self, *args, **kwargs):
    if armed[0] and point == "mid-write":
        die()
    return save_fn(self, *args, **kwargs)
async def renaming(src, dst):
    step_dir = armed[0] and os.path.basename(str(dst)) == str(kill_step)
    if step_dir and point == "before-rename":
        die()
    result = await rename(src, dst)
    if step_dir and point == "after-rename":
        die()
    return result
jh.JsonCheckpointHandler._save_fn = json_save
async_path.rename = renaming
runner.train(run_config.resolve({}, overrides), out)
"""


def _cfg():
    return run_config.resolve({}, OVERRIDES)


def _same_run(a, b):
    for name in ("final/adapters.safetensors", "metrics.jsonl", "history.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["ranks"] == sb["ranks"] and sa["metrics"] == sb["metrics"]


@pytest.fixture(scope="module")
def reference(fake_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    runner.train(_cfg(), out)
    return out


# Two of the DRILL's points. "mid-write" leaves what "before-rename" leaves, a temporary step
# directory never renamed into place, only with fewer files in it; on a local disk orbax tells
# such a directory by the temporary suffix of its name, whatever it holds, and the manager skips
# it and removes it when next opened. "before-rename" is the stronger of the two: its directory
# is complete, so only the name says that it must not be restored.
@pytest.mark.slow  # two killed and resumed runs in subprocesses: about 75 s (make test-slow)
@pytest.mark.parametrize("point", ["before-rename", "after-rename"])
def test_sigkill_inside_a_checkpoint_save_then_resume(reference, tmp_path, point):
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", DRILL, str(out), point, str(KILL_STEP), *OVERRIDES]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    steps = CheckpointManager(out / "checkpoints").all_steps()
    assert steps[-1] == (KILL_STEP if point == "after-rename" else KILL_STEP - 4), steps
    summary = runner.train(_cfg(), out, resume=True)
    assert summary["status"] == "finished"
    _same_run(reference, out)


def _tiny_state(v):
    return {"a": jnp.full((4,), v, jnp.float32)}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_disk_error_in_checkpoint_writer_keeps_the_previous(tmp_path, monkeypatch, code):
    mgr = CheckpointManager(tmp_path / "ck", keep=3, save_every=1)
    mgr.save(1, _tiny_state(1.0), {"step": 1})

    def failing(self, *args, **kwargs):
        raise OSError(code, os.strerror(code))

    threads = set(threading.enumerate())
    monkeypatch.setattr(JSON_HANDLER + "._save_fn", failing)
    with pytest.raises(CheckpointError) as err:
        mgr.save(2, _tiny_state(2.0), {"step": 2})
    monkeypatch.undo()
    message = str(err.value)
    assert (
        os.strerror(code).lower() in message and "previous checkpoint is intact (step 1)" in message
    )
    # no writer thread is left behind: orbax's own asyncio thread may still be finishing when
    # save returns (seen under load), so each new thread gets a few seconds to end
    left = [t for t in set(threading.enumerate()) - threads if not t.daemon]
    for t in left:
        t.join(timeout=10)
    assert not [t for t in left if t.is_alive()]
    assert sorted(os.listdir(tmp_path / "ck")) == ["1"]  # the failed step's tmp dir is gone
    state, meta = mgr.restore(_tiny_state(0.0))
    assert meta == {"step": 1} and float(state["a"][0]) == 1.0
    mgr.close()


@pytest.mark.slow  # a run stopped by a full disk, then resumed through the runner: about 35 s
def test_disk_full_during_training_then_resume(reference, tmp_path, monkeypatch, capsys):
    """Through the CLI: a one-line error, exit 2, the previous checkpoint intact; the resumed
    run then finishes exactly like the uninterrupted one."""
    from aroma_jax.cli import main

    save_fn = ocp.handlers.JsonCheckpointHandler._save_fn

    def full_at_step_8(self, item, directory):
        if f"/{KILL_STEP}.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return save_fn(self, item, directory)

    monkeypatch.setattr(JSON_HANDLER + "._save_fn", full_at_step_8)
    argv = ["train", "--output", str(tmp_path / "run")]
    for item in OVERRIDES:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if "error:" in x][-1]
    assert "no space left on device" in line and "previous checkpoint is intact (step 4)" in line
    monkeypatch.undo()
    assert CheckpointManager(tmp_path / "run" / "checkpoints").all_steps()[-1] == 4
    runner.train(_cfg(), tmp_path / "run", resume=True)
    _same_run(reference, tmp_path / "run")


def test_failed_peft_export_leaves_nothing_peft_would_load(reference, tmp_path, monkeypatch):
    from aroma_jax.train import export

    out = tmp_path / "peft"
    export.export_peft(reference, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 64)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(export, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        export.export_peft(reference, out, overwrite=True)  # replacing the old export
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export, whole
    with pytest.raises(OSError):
        export.export_peft(reference, tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "adapter_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_staged_export_moves_the_loader_file_last(tmp_path, monkeypatch):
    """A failure while moving files in leaves the directory without the file loaders open."""
    final = tmp_path / "out"
    moved = []
    real = os.replace

    def replace(src, dst):
        moved.append(os.path.basename(dst))
        if len(moved) == 2:
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError), staged_export(final, "adapter_config.json") as stage:
        for name in ("adapter_config.json", "a.safetensors", "b.safetensors"):
            (stage / name).write_text(name)
    assert moved == ["a.safetensors", "b.safetensors"]
    assert not (final / "adapter_config.json").exists()


def test_summary_write_on_full_disk_keeps_the_old(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    checkpoint.save_summary_atomic(path, {"status": "finished"})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_summary_atomic(path, {"status": "interrupted"})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"status": "finished"}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_abandon_joins_a_writer_thread_that_has_not_started_yet():
    """`threading.enumerate` lists a thread between ``start()`` and its first instruction;
    joining it then raises ``RuntimeError`` (seen once in CI). `_join` waits for it instead."""
    from aroma_jax.train.checkpoint import _join

    ran = threading.Event()
    writer = threading.Thread(target=ran.set)
    starter = threading.Timer(0.02, writer.start)
    starter.start()
    _join(writer, time.monotonic() + 10)  # called before the writer has started
    assert ran.is_set() and not writer.is_alive()
    never = threading.Thread(target=ran.set)
    _join(never, time.monotonic() + 0.01)  # never started: gives up at the deadline, no error
    starter.join()
