"""`BatchStream`: the (seed, step) batch order through grain, resumable, placed ahead."""

import numpy as np
import pytest

from aroma_jax.core import sharding
from aroma_jax.train.input import BatchStream
from aroma_jax.train.runner import batch_at

ARRAYS = {
    "input_ids": np.arange(50 * 3, dtype=np.int32).reshape(50, 3),
    "labels": np.arange(50, dtype=np.int32),
}


def _collect(stream) -> list[tuple[int, dict]]:
    return [(step, {k: np.asarray(v) for k, v in b.items()}) for step, b in stream]


@pytest.mark.parametrize("prefetch,threads", [(0, 0), (2, 2), (3, 0)])
def test_stream_is_batch_at_in_order(prefetch, threads):
    """Every mode yields exactly `batch_at`'s batches, across epoch boundaries (50 // 8 = 6)."""
    got = _collect(BatchStream(ARRAYS, 8, 3, None, 0, 15, prefetch=prefetch, threads=threads))
    assert [s for s, _ in got] == list(range(15))
    for step, batch in got:
        want = batch_at(ARRAYS, 8, 3, step)
        for k in ARRAYS:
            np.testing.assert_array_equal(batch[k], want[k])


def test_resumed_stream_sees_the_uninterrupted_batches():
    whole = _collect(BatchStream(ARRAYS, 8, 1, None, 0, 14))
    resumed = _collect(BatchStream(ARRAYS, 8, 1, None, 9, 14))
    assert [s for s, _ in resumed] == list(range(9, 14))
    for (s1, a), (s2, b) in zip(whole[9:], resumed, strict=True):
        assert s1 == s2
        for k in ARRAYS:
            np.testing.assert_array_equal(a[k], b[k])


def test_seed_changes_the_order():
    a = _collect(BatchStream(ARRAYS, 8, 0, None, 0, 2))
    b = _collect(BatchStream(ARRAYS, 8, 1, None, 0, 2))
    assert not np.array_equal(a[0][1]["labels"], b[0][1]["labels"])


def test_mesh_stream_places_global_batches_on_the_batch_axes():
    mesh = sharding.parse_mesh("data=2,fsdp=4")
    where = sharding.batch_sharding(mesh)
    assert sharding.process_rows(where, 16) == slice(0, 16)  # one process: every row
    stream = BatchStream(ARRAYS, 16, 2, mesh, 0, 3, prefetch=2)
    for step, batch in stream:
        assert batch["input_ids"].sharding == where
        assert batch["input_ids"].shape == (16, 3)
        np.testing.assert_array_equal(
            np.asarray(batch["labels"]), batch_at(ARRAYS, 16, 2, step)["labels"]
        )


def test_batch_at_rows_are_a_slice_of_the_batch():
    whole = batch_at(ARRAYS, 8, 5, 7)
    part = batch_at(ARRAYS, 8, 5, 7, slice(4, 8))
    np.testing.assert_array_equal(part["labels"], whole["labels"][4:8])
