"""W&B and MLflow trackers (`aroma_jax.train.trackers`) in their offline/local modes, read back:
the metrics.jsonl scalars, the resolved config, and every module's eq. 5 / eq. 6 ratios as
history.json records them. No network: W&B offline, MLflow's local file store."""

import json
import math
import struct
import sys
from typing import NamedTuple

import numpy as np
import pytest
import yaml

from aroma_jax.core.config import ConfigError
from aroma_jax.train import run_config, runner, trackers
from aroma_jax.train.hooks import TrainLoop
from tests.train.test_runner import cfg


def wandb_records(path):
    """The records of a W&B ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then
    LevelDB's log format (32 KiB blocks of chunks: crc32, length, type FULL/FIRST/MIDDLE/LAST)
    around protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def flat(by_step):
    return {(step, tag): v for step, values in by_step.items() for tag, v in values.items()}


def expected(run):
    """(step, tag) -> value the run should have logged: metrics.jsonl's scalars and the eq. 5 /
    eq. 6 ratios of history.json."""
    want: dict[int, dict[str, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        want.setdefault(record["step"], {}).update(trackers.scalars(record))
    history = json.loads((run / "history.json").read_text())
    for kind, key, records in (
        ("eq5", "rho_in", history["inner_checks"]),
        ("eq6", "rho_out", history["outer_steps"]),
    ):
        for rec in records:
            if math.isfinite(rec[key]):  # like TensorBoard, trackers take finite numbers only
                want.setdefault(rec["step"], {})[f"{kind}/{rec['module']}"] = rec[key]
    return flat(want)


def test_wandb_offline_and_mlflow_file_store(fake_assets, tmp_path, monkeypatch):
    # both in requirements-test.txt: skipped only outside `make test`'s environment
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks before a file store
    run = tmp_path / "run"
    # MLflow from the run config, W&B from Python (the two ways in)
    c = cfg(
        "tiny-roberta",
        "train.trackers=[mlflow]",
        f"train.tracker_dir={tmp_path / 'ml'}",
        "train.tracker_project=aroma-test",
    )
    wb = trackers.WandbTracker(project="aroma-test", directory=str(tmp_path / "wb"))
    runner.train(c, run, trackers=[wb])
    want = expected(run)
    assert any(tag.startswith("eq5/") for _, tag in want)
    assert any(tag.startswith("eq6/") for _, tag in want)
    ids = json.loads((run / trackers.IDS).read_text())
    resolved = yaml.safe_load((run / "config.yaml").read_text())  # the resolved config

    # W&B: the offline run's file, record by record
    (path,) = (tmp_path / "wb" / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-*.wandb")
    got: dict[int, dict[str, float]] = {}
    config = {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            step = items.pop("_step")
            got.setdefault(step, {}).update(
                {k: v for k, v in items.items() if not k.startswith("_")}
            )
        elif kind == "run":
            assert record.run.project == "aroma-test" and record.run.display_name == "run"
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    assert flat(got) == pytest.approx(want, rel=1e-6)
    assert {k: config[k] for k in resolved} == json.loads(json.dumps(resolved))

    # MLflow: the file store, through its client
    client = mlflow.tracking.MlflowClient((tmp_path / "ml").as_uri())
    ml = client.get_run(ids["mlflow"])
    assert ml.info.status == "FINISHED" and ml.info.run_name == "run"
    assert client.get_experiment(ml.info.experiment_id).name == "aroma-test"
    got = {}
    for key in ml.data.metrics:
        for m in client.get_metric_history(ml.info.run_id, key):
            got.setdefault(m.step, {})[m.key] = m.value
    assert flat(got) == pytest.approx(want, rel=1e-6)
    assert ml.data.params["train.batch_size"] == "8"
    assert ml.data.params["aroma.max_steps"] == "40"
    local = client.download_artifacts(ml.info.run_id, "config.json", str(tmp_path / "dl"))
    assert json.loads(open(local).read()) == json.loads(json.dumps(resolved))


def test_tracker_config_errors():
    with pytest.raises(ConfigError, match=r"train.trackers=.*tensorboard.*accepted .*wandb"):
        run_config.resolve({}, ["train.trackers=[tensorboard]"])
    with pytest.raises(ConfigError, match="distinct"):
        run_config.resolve({}, ["train.trackers=[wandb, wandb]"])
    with pytest.raises(ConfigError, match="tracker_dir"):
        run_config.resolve({}, ["train.tracker_dir=3"])


def test_missing_package_says_which_extra(monkeypatch, tmp_path):
    for name in ("wandb", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'aroma-jax\[mlflow\]'"):
        trackers.MlflowTracker().start({}, tmp_path, False)
    with pytest.raises(ImportError, match=r"pip install 'aroma-jax\[wandb\]'"):
        trackers.WandbTracker().start({}, tmp_path, False)


class Info(NamedTuple):  # the StepInfo fields the trackers read
    step: int
    checked: bool
    rho_in: np.ndarray
    outer: bool
    rho_out: np.ndarray


def test_module_values_and_window_hook():
    """eq. 5 only at checked steps, eq. 6 only at outer steps, per module in path order; NaN
    (a module not checked, or done) left out; a window hook sees every synced window."""
    nan = float("nan")
    infos = [
        Info(3, False, np.array([nan, nan]), False, np.array([nan, nan])),
        Info(4, True, np.array([0.5, nan]), False, np.array([nan, nan])),
        Info(8, True, np.array([0.25, 0.125]), True, np.array([2.0, nan])),
    ]
    got = trackers.module_values(["m/a", "m/b"], infos)
    assert got == {
        4: {"eq5/m/a": 0.5},
        8: {"eq5/m/a": 0.25, "eq5/m/b": 0.125, "eq6/m/a": 2.0},
    }
    assert trackers.scalars({"step": 8, "split": "validation", "accuracy": 0.5, "f1": nan}) == {
        "validation/accuracy": 0.5
    }

    class Paths:
        paths = ["m/a", "m/b"]

    logged = []

    class Mine(trackers.Tracker):
        def log_values(self, step, values):
            logged.append((step, dict(values)))

    loop = TrainLoop(Paths(), None, lambda s: s, 0, 1, step_fn=lambda st, b: (st, None))
    loop.add_window_hook(Mine().window)
    loop.window_event(infos)
    assert logged == sorted(got.items())


def test_tracker_is_abstract_and_trackers_fans_out(tmp_path):
    """`Tracker` cannot be built without ``log_values``; `Trackers` holds trackers (it is not
    one) and passes records, windows and the end on to those that started, once."""
    with pytest.raises(TypeError, match="log_values"):
        trackers.Tracker()

    class NoValues(trackers.Tracker):
        pass

    with pytest.raises(TypeError, match="log_values"):
        NoValues()

    calls = []

    class Recorder(trackers.Tracker):
        def __init__(self, tag):
            self.tag = tag

        def start(self, config, out, resume):
            calls.append((self.tag, "start", resume))

        def log_values(self, step, values):
            calls.append((self.tag, step, dict(values)))

        def finish(self, status):
            calls.append((self.tag, status))

    sink = trackers.Trackers([Recorder("a")])
    assert not isinstance(sink, trackers.Tracker)
    sink.trackers.append(Recorder("b"))  # as the runner adds the config's trackers
    sink.log({"step": 1, "loss": 0.5})  # before start: no tracker is open
    sink.start({}, tmp_path, True)
    sink.log({"step": 2, "loss": 0.25})
    sink.finish("interrupted")
    sink.finish("failed")  # already closed: nothing more
    assert calls == [
        ("a", "start", True),
        ("b", "start", True),
        ("a", 2, {"train/loss": 0.25}),
        ("b", 2, {"train/loss": 0.25}),
        ("a", "interrupted"),
        ("b", "interrupted"),
    ]
