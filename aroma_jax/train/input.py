"""The train step's input pipeline: grain for the host side, batches placed on devices ahead.

* Order: batch ``step`` is a pure function of ``(seed, step)`` (`batch_at`: epochs are
  seeded permutations), so the pipeline is deterministic and checkpointable by its position
  alone: a run resumed at step ``k`` positions grain's iterator at ``k`` (``set_state``) and
  sees exactly the batches of an uninterrupted run.
* Per process: each process gathers only its own rows of every global batch
  (`sharding.process_rows`) and turns them into global arrays with
  `jax.make_array_from_process_local_data`.
* Background: grain's thread pool gathers the next batches' rows while the step runs
  (``threads``, ``host_buffer``), and the next ``prefetch`` batches are already transferred to
  their devices (`jax.device_put` / `make_array_from_process_local_data` are asynchronous), so
  the step never waits for a host-to-device copy it could have overlapped.

Example:
    >>> # batches = BatchStream(arrays, batch_size=32, seed=0, mesh=None, start=0, stop=1000)
    >>> # for step, batch in batches: state, info = trainer.step(state, batch)
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np

from aroma_jax.core import sharding
from aroma_jax.data.stream import StreamedSplit


class BatchStream:
    """``(step, batch)`` for ``step`` in ``[start, stop)``, the batch already on its devices.

    Args:
      arrays: the tokenized training split (field -> array of rows), or a `StreamedSplit`
        (rows tokenized in grain's threads when their batch is gathered).
      batch_size: the global batch size.
      seed: the data seed (epoch permutations).
      mesh: the run's mesh (None: one device, the batch stays numpy until the step).
      start, stop: the steps to produce.
      prefetch: batches placed on devices ahead of the step (0: placed when asked for).
      threads: grain threads gathering rows in the background (0: in the caller's thread).
      host_buffer: gathered batches grain keeps ready on the host.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        seed: int,
        mesh: Any,
        start: int,
        stop: int,
        prefetch: int = 2,
        threads: int = 2,
        host_buffer: int = 4,
    ):
        self.start, self.stop, self.prefetch = start, stop, prefetch
        rows = None
        self._place: Callable[[dict], dict] = _to_device if prefetch > 0 else _numpy
        if mesh is not None:
            where = sharding.batch_sharding(mesh)
            rows = sharding.process_rows(where, batch_size)

            def place(batch: dict) -> dict:
                return sharding.make_global_batch(batch, where, batch_size)

            self._place = place
        dataset = grain.MapDataset.range(0, stop).map(
            lambda step: batch_at(arrays, batch_size, seed, int(step), rows)
        )
        if threads > 0:
            options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=host_buffer)
        else:
            options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        self._host = iter(dataset.to_iter_dataset(options))
        self._host.set_state({"next_index": start})  # grain jumps there: no earlier batch is read
        self._next = start
        self._ready: collections.deque = collections.deque()

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        return self

    def _fill(self, depth: int) -> None:
        while len(self._ready) < depth and self._next < self.stop:
            self._ready.append((self._next, self._place(next(self._host))))
            self._next += 1

    def __next__(self) -> tuple[int, dict]:
        self._fill(1)
        if not self._ready:
            raise StopIteration
        item = self._ready.popleft()
        self._fill(self.prefetch)  # dispatch the next transfers before the caller's step
        return item

    def state(self, step: int) -> dict:
        """What a checkpoint keeps of the pipeline: its position (the next step to feed)."""
        return {"next_index": int(step)}


class BatchError(RuntimeError):
    """The training split cannot fill one batch; the message says what is accepted."""


def batch_at(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    seed: int,
    step: int,
    rows: slice | None = None,
) -> dict:
    """The ``step``-th training batch: epochs are seeded permutations, the last partial batch of
    each epoch is dropped (static shapes, one compile). ``rows``: only those rows of the batch
    (a process's share, `sharding.process_rows`), read from ``arrays`` alone. ``arrays`` may be
    a `StreamedSplit`: then only those rows are read and tokenized, giving the same batch."""
    n = len(next(iter(arrays.values())))
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise BatchError(
            f"the training split has {n} examples, fewer than one batch "
            f"(train.batch_size={batch_size}): accepted train.batch_size <= {n}"
        )
    epoch, index = divmod(step, per_epoch)
    order = _order(seed, epoch, n)
    idx = order[index * batch_size : (index + 1) * batch_size]
    if rows is not None:
        idx = idx[rows]
    if isinstance(arrays, StreamedSplit):  # read and tokenize just these rows, now
        return arrays.take(idx)
    return {k: v[idx] for k, v in arrays.items()}


@functools.lru_cache(maxsize=2)
def _order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Epoch ``epoch``'s row order. Kept for the epoch's steps (and the next epoch's first,
    when grain's threads straddle the boundary): drawing a permutation of a million rows takes
    about 30 ms, too long to repeat each step."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order


def _to_device(batch: dict) -> dict:
    return jax.device_put(batch)  # asynchronous: the copy overlaps whatever runs meanwhile


def _numpy(batch: dict) -> dict:
    return batch


__all__ = ["BatchStream"]
