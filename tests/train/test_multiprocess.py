"""Two processes x 4 CPU devices against one process x 8 devices, on the same mesh.

Each process is started like a host of a pod (``AROMA_COORDINATOR`` / ``AROMA_NUM_PROCESSES`` /
``AROMA_PROCESS_ID``) and runs `runner.train` with JAX's gloo CPU collectives; the one-process
reference runs here (conftest gives this process 8 devices).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from aroma_jax.train import run_config, runner

pytestmark = pytest.mark.slow  # four 2-process runs: minutes on two cores

CONFIGS = Path(__file__).resolve().parents[2] / "aroma_jax" / "configs"
WORKER = Path(__file__).resolve().parent / "mp_worker.py"
MESH = "data=2,fsdp=4"
OVERRIDES = [
    "train.progress=false",
    "task.max_train_examples=128",
    "task.max_eval_examples=16",
    "train.batch_size=8",
    "train.eval_every=8",
    "train.eval_at_start=false",
    "train.log_every=2",
    "train.save_every=4",
    "aroma.max_steps=14",
    "aroma.inner_max_steps=4",
    "aroma.inner_check_every=2",
    "aroma.outer_tol=1e-4",
    "optimizer.warmup_steps=2",
    "aroma.rewarmup_steps=2",
    f"mesh={MESH}",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(out: Path, spec: dict, heartbeat: int = 20) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ)
        env.update(
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            AROMA_COORDINATOR=f"localhost:{port}",
            AROMA_NUM_PROCESSES="2",
            AROMA_PROCESS_ID=str(i),
            AROMA_HEARTBEAT_TIMEOUT=str(heartbeat),
            PYTHONPATH=os.pathsep.join(
                filter(None, [str(WORKER.parents[2]), env.get("PYTHONPATH")])
            ),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(out), json.dumps(spec)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _run(out: Path, timeout: float = 900, **spec) -> list[dict]:
    """Runs both processes to the end; each one's printed summary."""
    procs = _start(out, {"overrides": OVERRIDES, **spec})
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"process failed ({p.returncode}):\n{stderr[-3000:]}"
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def _cfg(*extra: str) -> dict:
    return run_config.load(CONFIGS / "tiny-llama.yaml", OVERRIDES + list(extra))


@pytest.fixture(scope="module")
def runs(fake_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    one = runner.train(_cfg(), root / "one")
    two = _run(root / "two")
    cut = _run(root / "cut", interrupt_at=6)
    shutil.copytree(root / "cut", root / "cut-to-one")  # the same checkpoint, resumed by one
    resumed = _run(root / "cut", resume=True)
    return root, one, two, cut, resumed


def test_two_process_checkpoint_resumes_on_one_process_and_another_mesh(runs):
    """Saved by 2 processes x 4 devices on data=2,fsdp=4, resumed by this process alone on
    fsdp=4,tensor=2 over 8 devices: orbax restores each leaf into the new shardings."""
    root, one, two, _, _ = runs
    run = root / "cut-to-one"
    resumed = runner.train(_cfg("mesh=fsdp=4,tensor=2"), run, resume=True)
    assert resumed["processes"] == 1 and resumed["steps"] == two[0]["steps"]
    assert resumed["ranks"] == two[0]["ranks"] and resumed["metrics"] == two[0]["metrics"]
    a, b = _train_losses(root / "two"), _train_losses(run)
    assert sorted(a) == sorted(b)
    assert [b[k] for k in sorted(b) if k <= 6] == [a[k] for k in sorted(a) if k <= 6]  # kept
    np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=1e-5)
    fa = load_file(str(root / "two" / "final" / "adapters.safetensors"))
    fb = load_file(str(run / "final" / "adapters.safetensors"))
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_allclose(fb[k], fa[k], rtol=1e-4, atol=1e-6)


def test_one_process_checkpoint_resumes_on_two_processes(runs, tmp_path):
    """Saved by this process alone (8 devices, data=2,fsdp=4) at step 6, resumed by 2 processes
    x 4 devices: the same run as the uninterrupted one-process run, within float tolerance."""
    root, one, _, _, _ = runs
    run = tmp_path / "one-to-two"
    cut = runner.train(_cfg(), run, interrupt_at=6)
    assert cut["status"] == "interrupted" and cut["step"] == 6
    resumed = _run(run, resume=True)
    for s in resumed:
        assert s["processes"] == 2 and s["steps"] == one["steps"]
        assert s["ranks"] == one["ranks"] and s["metrics"] == one["metrics"]
    a, b = _train_losses(root / "one"), _train_losses(run)
    assert sorted(a) == sorted(b)
    np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=1e-5)


def _train_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_two_processes_match_one(runs):
    root, one, two, _, _ = runs
    for s in two:  # every process returns the same summary
        assert s["processes"] == 2
        assert s["ranks"] == one["ranks"]
        assert s["metrics"] == one["metrics"]
        assert s["validation_metrics"] == one["validation_metrics"]
        assert s["outer_steps"] == one["outer_steps"] > 0
    written = json.loads((root / "two" / "summary.json").read_text())
    assert written["ranks"] == one["ranks"] and written["processes"] == 2
    a, b = _train_losses(root / "one"), _train_losses(root / "two")
    assert sorted(a) == sorted(b) and len(a) >= 5
    np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=1e-5)
    # Eval and final adapters agree too (the adapters were gathered from both processes).
    fa = load_file(str(root / "one" / "final" / "adapters.safetensors"))
    fb = load_file(str(root / "two" / "final" / "adapters.safetensors"))
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_allclose(fb[k], fa[k], rtol=1e-4, atol=1e-6)


def test_two_processes_streaming_match_one(runs, tmp_path):
    """task.streaming=true on 2 processes: the up-front one-process run's losses, and each
    process tokenizes only its 4 rows of each 8-row batch (after one whole batch at start-up,
    the check that the split fills a batch)."""
    root, one = runs[0], runs[1]
    two = _run(tmp_path / "s", overrides=OVERRIDES + ["task.streaming=true"], count_taken=True)
    for s in two:
        assert s["taken"] == [8] + [4] * 14
        assert s["ranks"] == one["ranks"] and s["metrics"] == one["metrics"]
    a, b = _train_losses(root / "one"), _train_losses(tmp_path / "s")
    assert sorted(a) == sorted(b)
    np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=1e-5)


def test_only_process_zero_writes(runs):
    root = runs[0]
    run = root / "two"
    for name in ("metrics.jsonl", "summary.json", "history.json", "config.yaml"):
        assert (run / name).is_file()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    keys = [(r["step"], r["split"]) for r in map(json.loads, lines)]
    assert len(keys) == len(set(keys)) > 0  # no record written twice
    assert not list(run.glob(".write-test*"))


def test_two_process_resume_is_bit_identical(runs):
    root, _, two, cut, resumed = runs
    assert [s["status"] for s in cut] == ["interrupted", "interrupted"]
    assert cut[0]["step"] == 6
    assert resumed[0]["steps"] == two[0]["steps"]
    assert resumed[0]["ranks"] == two[0]["ranks"]
    assert _train_losses(root / "cut") == _train_losses(root / "two")  # exact floats
    fa = load_file(str(root / "two" / "final" / "adapters.safetensors"))
    fb = load_file(str(root / "cut" / "final" / "adapters.safetensors"))
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].tobytes() == fb[k].tobytes(), k


def test_dead_process_stops_the_other(fake_assets, tmp_path):
    """SIGKILL one process mid-run: the other exits non-zero within the heartbeat timeout, with
    JAX's message, instead of waiting forever in a collective."""
    out = tmp_path / "dead"
    spec = {"overrides": OVERRIDES[:-6] + ["aroma.max_steps=100000", f"mesh={MESH}"]}
    procs = _start(out, spec, heartbeat=5)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 600
    try:
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline, "the run never logged two records"
            assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = procs[0].communicate(timeout=120)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0
    assert waited < 60, waited
    assert "another task died" in stderr or "died" in stderr, stderr[-2000:]


def test_refused_lock_stops_every_process(fake_assets, tmp_path):
    """A run directory held by another writer: process 0 is refused the lock and process 1, which
    takes no lock, stops too with the same line, instead of waiting in a collective."""
    from aroma_jax.train.lock import RunLock

    out = tmp_path / "held"
    with RunLock(out, "train"):  # this test process is the live holder
        procs = _start(out, {"overrides": OVERRIDES})
        try:
            errs = [p.communicate(timeout=300)[1] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    assert all(p.returncode != 0 for p in procs), errs
    for i, err in enumerate(errs):
        assert "is in use by `aroma-jax train`" in err and f"pid {os.getpid()}" in err, (
            i,
            err[-2000:],
        )
    assert "process 0 could not take the run directory's lock" in errs[1]
    assert not (out / "metrics.jsonl").exists()
