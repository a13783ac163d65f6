"""experiments/bench.py in its smoke mode: it runs and writes the promised keys (no timing)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "bench.py"),
            "--smoke",
            "--json",
            str(out),
            "--md",
            str(tmp_path / "bench.md"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    for key in (
        "device",
        "floor_s",
        "aroma_r1_s",
        "lora_r8_s",
        "outer_step_s",
        "train_step_compiles",
        "peak_memory_bytes",
        "optimizer_state_bytes_aroma_r1",
    ):
        assert key in data
    assert all(v == 1 for v in data["train_step_compiles"].values())
    assert "| floor |" in (tmp_path / "bench.md").read_text()
