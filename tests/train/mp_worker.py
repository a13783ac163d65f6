"""One process of a multi-process training run, for tests/train/test_multiprocess.py.

Usage: ``python mp_worker.py OUTPUT JSON`` with ``JSON`` = {"overrides": [...], "resume": bool,
"interrupt_at": int | null}; the process's place in the run comes from the ``AROMA_*``
environment, exactly as for ``aroma-jax train``. Prints the summary as one JSON line.
"""

import json
import sys
from pathlib import Path

from aroma_jax.core import sharding

sharding.initialize_distributed()  # before the imports below touch any device

from aroma_jax.train import run_config, runner  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "aroma_jax" / "configs"

if __name__ == "__main__":
    out, spec = sys.argv[1], json.loads(sys.argv[2])
    cfg = run_config.load(CONFIGS / "tiny-llama.yaml", spec["overrides"])
    summary = runner.train(
        cfg, out, resume=spec.get("resume", False), interrupt_at=spec.get("interrupt_at")
    )
    print(json.dumps(summary))
