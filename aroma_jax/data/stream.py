"""A training split tokenized on demand: only the rows a batch needs, when it needs them.

`StreamedSplit` stands where the up-front path's ``{field: array}`` of the whole tokenized
split stands. It holds the raw rows as a `datasets.Dataset` (Arrow, memory-mapped from the
``datasets`` cache for files and hub data, so the raw rows do not live in the Python heap) and
an ``encode`` function, the same one the up-front path applies to the whole split. Asking for
rows ``idx`` (`take`) reads just those rows and tokenizes them, so

* a large split (Commonsense170K, a JSONL of a million rows) is never held as token arrays,
  and no process tokenizes rows it does not feed;
* a batch is bit-identical to the up-front path's: every encoder pads to a fixed length, so a
  row's tokens do not depend on which other rows are encoded with it (tests check this).

Field shapes and dtypes come from encoding row 0 once, so code that only looks at shapes (the
memory estimate) sees the same thing as with arrays.

Example:
    >>> # split = StreamedSplit(task.splits["train"], lambda ds: encode(ds))
    >>> # batch = split.take(np.array([7, 3, 11]))  # {field: array of 3 rows}
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import datasets
import numpy as np
from datasets.table import InMemoryTable

# task.streaming=auto streams a training split of more rows than this (Commonsense170K's
# 170,020 and GLUE's MNLI, QQP and QNLI do; SST-2's 67,349 and the smaller GLUE tasks do not)
AUTO_ROWS = 100_000


def wanted(setting: bool | str, rows: int) -> bool:
    """Whether ``task.streaming`` (``True``, ``False`` or ``"auto"``) streams ``rows`` rows."""
    if setting == "auto":
        return rows > AUTO_ROWS
    return bool(setting)


class Column:
    """One field of a `StreamedSplit`: its shape and dtype, rows read by indexing."""

    def __init__(self, split: StreamedSplit, field: str, shape: tuple, dtype: np.dtype):
        self._split, self._field = split, field
        self.shape, self.dtype, self.ndim = shape, dtype, len(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> np.ndarray:
        return self._split.take(np.arange(len(self))[idx])[self._field]


class StreamedSplit(Mapping):
    """``{field: Column}`` over ``rows``, tokenized by ``encode`` on demand.

    Args:
      rows: the raw split (random access by row number).
      encode: ``Dataset -> {field: array}``, the up-front path's encoder for this task.
    """

    def __init__(self, rows: datasets.Dataset, encode: Callable[[datasets.Dataset], dict]):
        if len(rows) == 0:
            raise ValueError("cannot stream an empty split: accepted a split with rows")
        self.rows, self.encode = rows, encode
        # grain's threads call `take` concurrently, and a HF tokenizer keeps its truncation and
        # padding lengths as state: the seq2seq encoder's source and target calls, interleaved
        # across threads, gave rows of the wrong length (tests/train/test_stream.py). Encoding
        # is serial; it still runs off the step's thread.
        self._lock = threading.Lock()
        first = encode(rows.select([0]))
        self._columns = {
            k: Column(self, k, (len(rows), *v.shape[1:]), v.dtype) for k, v in first.items()
        }

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``idx`` (row numbers, in that order) of every field, tokenized now."""
        # a small in-memory Dataset of just these rows (`datasets` gathers them from the Arrow
        # chunks); the encoders then iterate 32 rows, not a view over the whole table
        picked = self.rows[[int(i) for i in idx]]
        table = InMemoryTable.from_pydict(picked, schema=self.rows.features.arrow_schema)
        # a fixed fingerprint: hashing every batch's rows would cost `datasets` 6 ms a batch,
        # and these throwaway datasets are never cached
        rows = datasets.Dataset(table, fingerprint="aroma-stream-batch")
        with self._lock:
            return self.encode(rows)

    def __getitem__(self, field: str) -> Column:
        return self._columns[field]

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns)

    def __len__(self) -> int:
        return len(self._columns)


__all__ = ["AUTO_ROWS", "Column", "StreamedSplit", "wanted"]
