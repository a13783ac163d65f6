"""`task.streaming`: a training split tokenized per batch gives the up-front path's batches, per
process and on resume, without tokenizing or holding the whole split."""

import json
import tracemalloc

import datasets
import jax
import numpy as np
import pytest

from aroma_jax.core import sharding
from aroma_jax.data import commonsense, tasks
from aroma_jax.data.base import Task
from aroma_jax.data.stream import AUTO_ROWS, StreamedSplit, wanted
from aroma_jax.models.hf import simple_tokenizer
from aroma_jax.train.input import BatchStream, batch_at

WORDS = "the cat sat on a mat dog ran far away quick brown fox jumps over lazy".split()


def _text(i: int) -> str:
    return " ".join(WORDS[(i * k + k) % len(WORDS)] for k in range(1 + i % 9))


def _task(n: int) -> Task:
    rows = [{"text": _text(i), "text_pair": _text(i + 3), "label": i % 3} for i in range(n)]
    return Task(
        "t",
        "pair_classification",
        3,
        {"train": datasets.Dataset.from_list(rows)},
        text_pair_field="text_pair",
        label_names=("a", "b", "c"),
    )


TOK = simple_tokenizer(WORDS + ["Answer:", "a", "b", "c"])


class Counting:
    """An encoder that counts the rows it was asked to tokenize."""

    def __init__(self, encode):
        self.encode, self.rows = encode, 0

    def __call__(self, ds):
        self.rows += len(ds)
        return self.encode(ds)


def _encoders(task: Task) -> dict:
    def on(rows):
        return {**task.__dict__, "splits": {"train": rows}}

    def commonsense_rows(ds):
        return ds.map(
            lambda r: {
                "instruction": r["text"],
                "input": r["text_pair"],
                "output": "the answer is " + "abc"[r["label"]],
            }
        )

    return {
        "classification": lambda ds: tasks.encode_classification(Task(**on(ds)), TOK, "train", 12),
        "causal_lm": lambda ds: tasks.encode_causal_lm(Task(**on(ds)), TOK, "train", 16),
        "instruction": lambda ds: commonsense.encode_train(commonsense_rows(ds), TOK, 20),
    }


class _HalfOfTheDevices:
    """A batch sharding as process ``p`` of 2 (4 devices each) sees it: only its devices are
    addressable, so `sharding.process_rows` gives that process's rows."""

    def __init__(self, where, p: int):
        self.where, self.p = where, p

    def addressable_devices_indices_map(self, shape):
        full = self.where.devices_indices_map(shape)
        mine = set(jax.devices()[4 * self.p : 4 * self.p + 4])
        return {d: i for d, i in full.items() if d in mine}


@pytest.mark.parametrize("kind", ["classification", "causal_lm", "instruction"])
def test_streamed_batches_equal_up_front_batches_per_process(kind):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    task = _task(45)
    encode = _encoders(task)[kind]
    whole = encode(task.splits["train"])
    streamed = StreamedSplit(task.splits["train"], encode)
    assert {k: (c.shape, c.dtype) for k, c in streamed.items()} == {
        k: (v.shape, v.dtype) for k, v in whole.items()
    }
    where = sharding.batch_sharding(sharding.parse_mesh("data=8"))
    rows = [sharding.process_rows(_HalfOfTheDevices(where, p), 8) for p in (0, 1)]
    assert rows == [slice(0, 4), slice(4, 8)]
    for step in range(12):  # 45 // 8 = 5 batches an epoch: crosses two epoch boundaries
        want = batch_at(whole, 8, 7, step)
        got = batch_at(streamed, 8, 7, step)
        for k in whole:
            np.testing.assert_array_equal(got[k], want[k])
            assert got[k].dtype == want[k].dtype
        for r in rows:
            counted = Counting(encode)
            part = batch_at(StreamedSplit(task.splits["train"], counted), 8, 7, step, r)
            assert counted.rows == 1 + 4  # shapes (row 0 once) + exactly this process's rows
            for k in whole:
                np.testing.assert_array_equal(part[k], want[k][r])


def test_streamed_resume_continues_with_the_same_batches():
    task = _task(45)
    encode = _encoders(task)["causal_lm"]
    streamed = StreamedSplit(task.splits["train"], encode)
    whole = encode(task.splits["train"])

    def collect(arrays, start, threads):
        stream = BatchStream(arrays, 8, 3, None, start, 14, prefetch=2, threads=threads)
        return [(s, {k: np.asarray(v) for k, v in b.items()}) for s, b in stream]

    uninterrupted = collect(whole, 0, 0)
    for start, threads in ((6, 2), (11, 0)):
        resumed = collect(streamed, start, threads)
        assert [s for s, _ in resumed] == list(range(start, 14))
        for (s1, a), (s2, b) in zip(uninterrupted[start:], resumed, strict=True):
            assert s1 == s2
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_large_jsonl_is_not_tokenized_or_held_whole(tmp_path):
    """200,000 JSONL rows, memory-mapped by `datasets`: 5 batches tokenize 1 + 5 x 32 rows, and
    the Python heap peak is a small fraction of what the up-front token arrays alone take
    (52 MB)."""
    n = 200_000
    path = tmp_path / "train.jsonl"
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"text": _text(i), "label": i % 2}) + "\n")
    rows = datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache")
    )
    task = Task("big", "classification", 2, {"train": rows})
    encode = Counting(
        lambda ds: tasks.encode_classification(
            Task("big", "classification", 2, {"train": ds}), TOK, "train", 32
        )
    )
    tracemalloc.start()
    streamed = StreamedSplit(task.splits["train"], encode)
    batches = [batch_at(streamed, 32, 0, step) for step in range(5)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert encode.rows == 1 + 5 * 32
    assert batches[0]["input_ids"].shape == (32, 32)
    up_front = sum(np.prod(c.shape) * c.dtype.itemsize for c in streamed.values())
    assert up_front == n * (32 * 4 * 2 + 4)  # input_ids, attention_mask (int32), labels
    # the peak is mostly batch_at's epoch permutation (n int64: 1.6 MB), not rows or tokens
    assert peak < 8 * n + 512 * 1024 and peak < up_front / 20, (peak, up_front)


def test_auto_streams_only_large_splits():
    assert not wanted("auto", AUTO_ROWS) and wanted("auto", AUTO_ROWS + 1)
    assert wanted(True, 10) and not wanted(False, 10**7)


def _train_losses(run) -> list[float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["split"] == "train"]


@pytest.mark.slow
def test_streamed_run_has_the_up_front_losses_and_resumes_across_the_switch(
    fake_assets, tmp_path, monkeypatch
):
    """tiny-llama, 12 steps: the same losses and metrics with task.streaming on and off, and a
    run started up front and resumed streaming writes the same metrics, line by line."""
    from aroma_jax import configs
    from aroma_jax.train import run_config, runner

    common = [
        "train.progress=false",
        "task.max_train_examples=96",
        "task.max_eval_examples=16",
        "train.batch_size=8",
        "train.eval_at_start=false",
        "train.eval_every=100",
        "train.log_every=2",
        "train.save_every=6",
        "aroma.max_steps=12",
        "aroma.inner_max_steps=6",
        "aroma.inner_check_every=3",
        "optimizer.warmup_steps=2",
    ]

    def cfg(*extra):
        return run_config.load(configs.root() / "tiny-llama.yaml", common + list(extra))

    taken = []
    take = StreamedSplit.take
    monkeypatch.setattr(
        StreamedSplit, "take", lambda self, idx: taken.append(len(idx)) or take(self, idx)
    )
    off = runner.train(cfg("task.streaming=false"), tmp_path / "off")
    assert taken == []
    on = runner.train(cfg("task.streaming=true"), tmp_path / "on")
    assert taken[:12] == [8] * 12  # the run's batches were read through the stream
    assert len(_train_losses(tmp_path / "off")) == 6
    assert _train_losses(tmp_path / "on") == _train_losses(tmp_path / "off")
    assert on["metrics"] == off["metrics"] and on["ranks"] == off["ranks"]

    half = tmp_path / "half"
    s = runner.train(cfg("task.streaming=false"), half, interrupt_at=7)
    assert s["status"] == "interrupted" and s["step"] == 7
    runner.train(cfg("task.streaming=true"), half, resume=True)
    assert (half / "metrics.jsonl").read_text() == (tmp_path / "off" / "metrics.jsonl").read_text()


def test_concurrent_takes_from_grain_threads_are_safe():
    """grain gathers batches in several threads. The seq2seq encoder tokenizes sources and
    targets with different lengths, so unserialized threads would race on the tokenizer's
    truncation setting; every batch must still equal the up-front one."""
    from concurrent.futures import ThreadPoolExecutor

    rows = [{"text": _text(i) + " " + _text(i + 1), "target": _text(i + 2)} for i in range(45)]
    task = Task("g", "generation", 0, {"train": datasets.Dataset.from_list(rows)})

    def encode(ds):
        return tasks.encode_seq2seq(
            Task("g", "generation", 0, {"train": ds}), TOK, "train", 12, 5, 1
        )

    whole = encode(task.splits["train"])
    streamed = StreamedSplit(task.splits["train"], encode)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda s: batch_at(streamed, 8, 5, s), range(60)))
    for step, batch in enumerate(got):
        want = batch_at(whole, 8, 5, step)
        for k in want:
            np.testing.assert_array_equal(batch[k], want[k])


def test_streamed_split_through_a_mesh_batch_stream():
    """On a mesh the stream places global batches; streamed, they equal the up-front ones."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    task = _task(45)
    encode = _encoders(task)["classification"]
    whole = encode(task.splits["train"])
    mesh = sharding.parse_mesh("data=2,fsdp=4")
    streamed = StreamedSplit(task.splits["train"], encode)
    for step, batch in BatchStream(streamed, 16, 2, mesh, 0, 4, prefetch=2):
        assert batch["input_ids"].sharding == sharding.batch_sharding(mesh)
        want = batch_at(whole, 16, 2, step)
        for k in want:
            np.testing.assert_array_equal(np.asarray(batch[k]), want[k])
