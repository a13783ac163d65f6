"""Starts the processes of a multi-process JAX job on this machine, each with its own CPU
devices, the way a pod's hosts are started (``AROMA_COORDINATOR`` / ``AROMA_NUM_PROCESSES`` /
``AROMA_PROCESS_ID``); for the tests that run 2 processes x 4 devices."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(
    worker: Path, args: list[str], processes: int = 2, devices: int = 4, heartbeat: int = 20
) -> list[subprocess.Popen]:
    """``python worker *args`` once per process, stdout and stderr piped."""
    port = free_port()
    procs = []
    for i in range(processes):
        env = dict(os.environ)
        env.update(
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            AROMA_COORDINATOR=f"localhost:{port}",
            AROMA_NUM_PROCESSES=str(processes),
            AROMA_PROCESS_ID=str(i),
            AROMA_HEARTBEAT_TIMEOUT=str(heartbeat),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 900) -> list[str]:
    """Waits for every process; each one's stdout. A failed process fails with its stderr."""
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"process failed ({p.returncode}):\n{stderr[-3000:]}"
            outs.append(stdout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs
