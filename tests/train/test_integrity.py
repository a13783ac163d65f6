"""Run integrity (issue 32): one writer per run directory, verified and rebuildable final/,
text class labels carried to eval and exports, exports that never replace another run's files,
a quiet train command."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from aroma_jax.cli import main
from aroma_jax.data import tasks
from aroma_jax.train import artifacts, lock, run_config, runner

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "train.progress=false",
    "train.eval_at_start=false",
    "train.batch_size=8",
    "task.max_train_examples=64",
    "task.max_eval_examples=16",
]
TEXT_CSV = "text,label\n" + "".join(
    f"review number {i} is ok,{'pos' if i % 2 else 'neg'}\n" for i in range(40)
)


def _cfg(*extra: str) -> dict:
    return run_config.resolve({"model": {"name": "tiny-roberta"}}, TINY + list(extra))


# ------------------------------------------------------------------------------------- lock
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_refuses_a_second_writer_and_names_the_holder(tmp_path):
    with lock.RunLock(tmp_path, "train"):
        record = json.loads((tmp_path / lock.LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["command"] == "train" and record["started"].endswith("UTC")
        with pytest.raises(
            lock.RunLockError,
            match=rf"in use by `aroma-jax train` \(pid {os.getpid()} on this host",
        ):
            lock.RunLock(tmp_path, "export").acquire()
    assert not (tmp_path / lock.LOCK_NAME).exists()
    lock.check_free(tmp_path)


def test_eval_refuses_while_another_process_writes(tmp_path):
    holder = (
        "import sys, time; from aroma_jax.train.lock import RunLock; "
        "l = RunLock(sys.argv[1], 'train'); l.acquire(); print('held', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(lock.RunLockError, match=rf"being written by .*pid {proc.pid} on this"):
            lock.check_free(tmp_path)
        with pytest.raises(lock.RunLockError, match=rf"in use by .*pid {proc.pid} on this"):
            lock.RunLock(tmp_path, "finalize").acquire()
    finally:
        proc.kill()
        proc.wait()
    lock.check_free(tmp_path)  # killed: its record is stale, and the next writer takes it over
    with lock.RunLock(tmp_path, "train"):
        pass


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_lock_is_released_on_an_exception_and_ctrl_c(tmp_path, exc):
    with pytest.raises(exc):
        with lock.RunLock(tmp_path, "train"):
            raise exc()
    assert not (tmp_path / lock.LOCK_NAME).exists()
    with lock.RunLock(tmp_path, "train"):  # free again
        pass


def test_stale_lock_of_this_host_is_taken_over_with_a_message(tmp_path, capsys):
    pid = _dead_pid()
    record = {"host": socket.gethostname(), "pid": pid, "started": "then", "command": "train"}
    (tmp_path / lock.LOCK_NAME).write_text(json.dumps(record))
    lock.check_free(tmp_path)  # a dead holder does not block readers
    with lock.RunLock(tmp_path, "train --resume"):
        assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert (
        f"taking over the stale lock of {str(tmp_path)!r} left by `aroma-jax train` (pid {pid}"
        in err
    )


def test_other_hosts_lock_needs_break_lock(tmp_path, capsys):
    record = {"host": "node-7", "pid": 1, "started": "then", "command": "train"}
    (tmp_path / lock.LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(lock.RunLockError, match="on host 'node-7'.*pass --break-lock"):
        lock.RunLock(tmp_path, "train").acquire()
    with pytest.raises(lock.RunLockError, match="being written by"):
        lock.check_free(tmp_path)
    with lock.RunLock(tmp_path, "train", break_lock=True):
        pass
    assert "breaking the lock" in capsys.readouterr().err
    assert not (tmp_path / lock.LOCK_NAME).exists()


def test_only_process_zero_takes_the_lock(tmp_path, monkeypatch):
    """Process 0 of several takes the lock; the others take none and learn process 0's answer
    (`_from_process_zero`, a broadcast: here its answer is given)."""
    import jax

    told = {"answer": ""}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(lock, "_from_process_zero", lambda msg: msg or told["answer"])
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with lock.hold(tmp_path, "train"):
        assert not (tmp_path / lock.LOCK_NAME).exists()
    told["answer"] = "run directory 'D' is in use by `aroma-jax train` (pid 7 on this host)"
    with pytest.raises(lock.RunLockError, match="process 0 could not take .*pid 7 on this host"):
        with lock.hold(tmp_path, "train"):
            pytest.fail("process 1 ran although process 0 was refused")
    told["answer"] = ""
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with lock.hold(tmp_path, "train"):
        assert (tmp_path / lock.LOCK_NAME).exists()
        with pytest.raises(lock.RunLockError, match="is in use by"):  # process 0 refused
            with lock.hold(tmp_path, "train"):
                pytest.fail("a second process 0 got the lock")
    assert not (tmp_path / lock.LOCK_NAME).exists()


@pytest.mark.slow  # two CLI processes, one of them trains: 541 s at load 30 on 2 shared cores
def test_two_train_processes_at_once(fake_assets, tmp_path):
    """Two real `aroma-jax train` processes into one directory: the second is refused while the
    first runs, and the first run's files are whole (one metrics row per step, final/ valid)."""
    out = tmp_path / "run"
    args = ["--no-progress", "--set", "model.name=tiny-roberta", "--output", str(out)]
    for item in TINY[1:] + ["aroma.max_steps=6", "train.log_every=1"]:
        args += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "aroma_jax.cli", "train", *args]
    first = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not (out / lock.LOCK_NAME).exists():  # the first holds the lock
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.poll() is None  # both were running at once
    _, err1 = first.communicate(timeout=600)
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr
    assert (
        f"aroma-jax train: error: run directory {str(out)!r} is in use by `aroma-jax train` "
        f"(pid {first.pid} on this host" in second.stderr
    )
    assert first.returncode == 0, err1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert artifacts.verify_final(out / "final")["step"] == 6
    assert not (out / lock.LOCK_NAME).exists()  # released at exit


# --------------------------------------------------------------------------- verified final
@pytest.fixture(scope="module")
def text_run(fake_assets, tmp_path_factory):
    """A finished run on a CSV with text labels (neg/pos), read only by the tests below."""
    root = tmp_path_factory.mktemp("text")
    (root / "data.csv").write_text(TEXT_CSV)
    run = root / "run"
    runner.train(_cfg(f"task.name=local:{root / 'data.csv'}", "aroma.max_steps=4"), run)
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    return dest


def test_final_has_fingerprints_and_finalize_rebuilds_it_byte_for_byte(text_run, tmp_path, capsys):
    run = _copy(text_run, tmp_path)
    manifest = artifacts.verify_final(run / "final")
    assert manifest["step"] == 4 and set(manifest["files"]) == set(artifacts.FILES)
    want = {n: (run / "final" / n).read_bytes() for n in artifacts.FILES}
    path = run / "final" / "adapters.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 1  # one flipped bit: same size, another sha256
    path.write_bytes(bytes(data))
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "adapters.safetensors' is damaged (its sha256 differs" in err
    assert f"`aroma-jax finalize {run}`" in err and len(err.strip().splitlines()) == 1
    assert main(["finalize", str(run)]) == 0
    assert {n: (run / "final" / n).read_bytes() for n in artifacts.FILES} == want
    assert not list(run.glob(".final.*"))  # no staging directory left
    assert main(["eval", str(run), "--split", "validation"]) == 0


def test_finalize_refuses_when_the_last_checkpoint_is_not_the_runs_last_step(text_run, tmp_path):
    import shutil

    run = _copy(text_run, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["steps"] = 99
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(Exception, match="is step 4, but the run finished at step 99"):
        from aroma_jax.train.finalize import finalize_run

        finalize_run(run)
    shutil.rmtree(run / "final")
    summary["steps"] = 4
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(artifacts.FinalError, match="final' is missing: rebuild final/"):
        artifacts.verify_final(run / "final")


# ---------------------------------------------------------------------------- class labels
def test_text_labels_map_is_saved_and_reaches_the_exports(text_run, tmp_path):
    import transformers

    cfg = run_config.load_run(text_run)
    assert cfg.task.label_names == ("neg", "pos")
    meta = json.loads((text_run / "final" / "meta.json").read_text())
    assert meta["label_names"] == ["neg", "pos"]
    assert (
        main(
            [
                "export",
                str(text_run),
                "--merged",
                str(tmp_path / "m"),
                "--peft",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    for d in ("m", "p"):
        config = transformers.AutoConfig.from_pretrained(tmp_path / d)
        assert config.id2label == {0: "neg", 1: "pos"} and config.label2id == {"neg": 0, "pos": 1}
    assert (tmp_path / "p" / "adapter_config.json").exists()


def test_label_names_order_and_numeric_text():
    values = ["pos", "neg", "pos"]
    assert tasks.class_ids(values, None, "f") == ([1, 0, 1], ("neg", "pos"))
    assert tasks.class_ids(values, ["pos", "neg"], "f") == ([0, 1, 0], ("pos", "neg"))
    assert tasks.text_labels(["1", "0", "2"], None, "f") == ([1, 0, 2], ())
    assert tasks.text_labels(["0.5", "1.5"], None, "f") == ([0.5, 1.5], ())
    with pytest.raises(tasks.DataError, match=r"mixes numbers and text \(row 2: 'x'\)"):
        tasks.text_labels(["1", "x"], None, "f")


def test_hub_class_label_and_text_columns_map_to_ids():
    import datasets

    feat = datasets.Features(
        {"t": datasets.Value("string"), "label": datasets.ClassLabel(names=["no", "yes"])}
    )
    a = datasets.Dataset.from_dict({"t": ["x", "y"], "label": [1, 0]}, features=feat)
    parts, names, text = tasks.map_classes([a], "label", None, "hub")
    assert names == ("no", "yes") and parts[0]["label"] == [1, 0] and not text
    parts, names, _ = tasks.map_classes([a], "label", ["yes", "no"], "hub")
    assert names == ("yes", "no") and parts[0]["label"] == [0, 1]
    b = datasets.Dataset.from_dict({"t": ["x", "y"], "label": ["b", "a"]})
    c = datasets.Dataset.from_dict({"t": ["z"], "label": ["c"]})
    parts, names, text = tasks.map_classes([b, c], "label", None, "copy")
    assert names == ("a", "b", "c") and parts[0]["label"] == [1, 0] and parts[1]["label"] == [2]
    assert text


def test_glue_local_copy_with_text_labels(tmp_path):
    from aroma_jax.data.glue import glue

    for split, n in (("train", 12), ("validation", 4)):
        (tmp_path / "sst2").mkdir(exist_ok=True)
        rows = [
            {"sentence": f"s {i}", "label": "positive" if i % 2 else "negative", "idx": i}
            for i in range(n)
        ]
        (tmp_path / "sst2" / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
    task = glue("sst2", source=str(tmp_path))
    assert task.label_names == ("negative", "positive") and task.text_labels
    assert np.asarray(task.splits["train"]["label"]).tolist() == [0, 1] * 6


# ---------------------------------------------------------------------------------- exports
def test_export_refuses_model_files_and_overwrite_keeps_other_files(text_run, tmp_path, capsys):
    target = tmp_path / "peft"
    target.mkdir()
    (target / "adapter_model.safetensors").write_bytes(b"another run's adapter")
    (target / "notes.txt").write_text("mine")
    assert main(["export", str(text_run), "--peft", str(target)]) == 2
    assert (
        "already holds model or adapter files (adapter_model.safetensors)"
        in capsys.readouterr().err
    )
    assert (target / "adapter_model.safetensors").read_bytes() == b"another run's adapter"
    assert main(["export", str(text_run), "--peft", str(target), "--overwrite"]) == 0
    assert (target / "adapter_model.safetensors").read_bytes() != b"another run's adapter"
    assert (target / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------ quiet
def _base_model_dir(path: Path, torch_weights: bool = False) -> None:
    """A local BERT without a classifier and with a tokenizer: loading it for classification
    makes transformers print its weight-loading notes."""
    import transformers

    from aroma_jax.models.hf import simple_tokenizer

    tok = simple_tokenizer(["a b c d e f g review number is ok"], vocab_size=200)
    cfg = transformers.BertConfig(
        vocab_size=256,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    if torch_weights:  # model.safetensors in PyTorch layout, as the hub ships it
        transformers.BertModel(cfg).save_pretrained(path)
    else:
        transformers.FlaxBertModel(cfg, seed=0).save_pretrained(path)
    tok.save_pretrained(path)


@pytest.mark.hf4  # transformers' notes come from its Flax loading (model.impl=hf)
def test_train_is_quiet_by_default_and_verbose_shows_the_notes(
    fake_assets, tmp_path, capfd, caplog
):
    _base_model_dir(tmp_path / "m")
    base = ["train", "--no-progress", "--set", f"model.name={tmp_path / 'm'}"]
    # HF Flax prints the notes; the native encoder (impl auto) loads without any
    for item in TINY[1:] + ["aroma.max_steps=1", "task.max_len=16", "model.impl=hf"]:
        base += ["--set", item]
    note = "were not initialized"  # transformers' note about the fresh classifier
    assert main([*base, "--output", str(tmp_path / "q")]) == 0
    assert not any(note in r.getMessage() for r in caplog.records)
    err = capfd.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines[0] == f"config: {tmp_path / 'q' / 'config.yaml'}", err
    assert lines[1].startswith("head: 2-class classifier (rotten, fresh), ") and len(lines) == 2, (
        err
    )
    assert main([*base, "--output", str(tmp_path / "v"), "--verbose"]) == 0
    # transformers' handler writes to the stderr it found first; its records reach caplog
    assert any(note in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_native_train_prints_only_its_own_lines(fake_assets, tmp_path, capfd):
    """On the default path (native encoder, transformers 5 or 4) the train command's stderr is
    the config path and the head line, nothing from transformers, jax or the tokenizer."""
    pytest.importorskip("torch")
    _base_model_dir(tmp_path / "m", torch_weights=True)
    capfd.readouterr()  # save_pretrained's own progress bar
    args = ["train", "--no-progress", "--set", f"model.name={tmp_path / 'm'}"]
    for item in TINY[1:] + ["aroma.max_steps=1", "task.max_len=16"]:
        args += ["--set", item]
    assert main([*args, "--output", str(tmp_path / "q")]) == 0
    err = capfd.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines[0] == f"config: {tmp_path / 'q' / 'config.yaml'}", err
    assert len(lines) == 2 and lines[1].startswith("head: 2-class classifier"), err
