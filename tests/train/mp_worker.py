"""One process of a multi-process training run, for tests/train/test_multiprocess.py.

Usage: ``python mp_worker.py OUTPUT JSON`` with ``JSON`` = {"overrides": [...], "resume": bool,
"interrupt_at": int | null, "count_taken": bool}; the process's place in the run comes from the
``AROMA_*`` environment, exactly as for ``aroma-jax train``. Prints the summary as one JSON line
(with ``count_taken``: plus ``taken``, the rows of each `StreamedSplit.take` call).
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
    taken: list[int] = []  # rows a streamed training split tokenized, per call
    if spec.get("count_taken"):
        from aroma_jax.data.stream import StreamedSplit

        take = StreamedSplit.take
        StreamedSplit.take = lambda self, idx: taken.append(len(idx)) or take(self, idx)
    summary = runner.train(
        cfg, out, resume=spec.get("resume", False), interrupt_at=spec.get("interrupt_at")
    )
    if spec.get("count_taken"):
        summary["taken"] = taken
    print(json.dumps(summary))
