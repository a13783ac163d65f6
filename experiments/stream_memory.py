"""Host memory and time of the training split, tokenized up front vs streamed (`task.streaming`).

Writes a JSONL of ``--rows`` short rows, loads it as the pipeline does (`datasets`, Arrow
memory-mapped from its cache), then for each mode measures the Python heap peak (tracemalloc),
the process's peak resident memory, the wall time of building the split and of reading
``--steps`` batches with `batch_at`, and how many rows were tokenized. Each mode runs in a
fresh process, so one does not count the other.

    python experiments/stream_memory.py --rows 1000000 --batch 32 --max-len 32 --steps 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

WORDS = "the cat sat on a mat dog ran far away quick brown fox jumps over lazy".split()


def _text(i: int) -> str:
    return " ".join(WORDS[(i * k + k) % len(WORDS)] for k in range(1 + i % 9))


def measure(path: str, mode: str, batch: int, max_len: int, steps: int) -> dict:
    import datasets

    from aroma_jax.data import tasks
    from aroma_jax.data.base import Task
    from aroma_jax.data.stream import StreamedSplit
    from aroma_jax.models.hf import simple_tokenizer
    from aroma_jax.train.input import batch_at

    tok = simple_tokenizer(WORDS)
    rows = datasets.load_dataset("json", data_files=path, split="train")
    count = [0]

    def encode(ds):
        count[0] += len(ds)
        return tasks.encode_classification(
            Task("big", "classification", 2, {"train": ds}), tok, "train", max_len
        )

    tracemalloc.start()
    t0 = time.perf_counter()
    split = StreamedSplit(rows, encode) if mode == "streamed" else encode(rows)
    t1 = time.perf_counter()
    for step in range(steps):
        b = batch_at(split, batch, 0, step)
    t2 = time.perf_counter()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert b["input_ids"].shape == (batch, max_len)
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    return {
        "mode": mode,
        "rows": len(rows),
        "rows_tokenized": count[0],
        "heap_peak_mb": round(peak / 2**20, 2),
        "max_rss_mb": round(rss),
        "build_s": round(t1 - t0, 3),
        "ms_per_batch": round(1000 * (t2 - t1) / steps, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--modes", default="up_front,streamed", help="comma-separated")
    p.add_argument("--one", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one[0], a.one[1], a.batch, a.max_len, a.steps)))
        return
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train.jsonl"
        with path.open("w") as f:
            for i in range(a.rows):
                f.write(json.dumps({"text": _text(i), "label": i % 2}) + "\n")
        print(f"{path.stat().st_size / 2**20:.1f} MB JSONL, {a.rows} rows", file=sys.stderr)
        for mode in a.modes.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--one",
                str(path),
                mode,
                "--batch",
                str(a.batch),
                "--max-len",
                str(a.max_len),
                "--steps",
                str(a.steps),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
