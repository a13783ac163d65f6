"""Experiment trackers (Weights & Biases, MLflow) fed by the run's hooks.

A tracker gets, on process 0 of a run only:

- ``start(config, out, resume)``: the resolved run config, once before the first step;
- ``log(record)``: every record the run writes to metrics.jsonl (train windows, validation and
  test evaluations), whose numbers are the scalars TensorBoard gets, under the same tags
  (`scalars`: ``train/loss``, ``validation/accuracy``, ...);
- ``window(loop, infos)``: every synced window of host `StepInfo`s (a window hook of
  `aroma_jax.train.hooks.TrainLoop`), from which `module_values` takes each module's eq. 5
  ratio at its inner checks (``eq5/<module>``) and eq. 6 ratio at outer steps
  (``eq6/<module>``), logged at their own steps;
- ``finish(status)``: ``finished``, ``interrupted`` or ``failed``, once.

``train.trackers: [wandb, mlflow]`` in a run config (with ``train.tracker_project``,
``tracker_run_name``, ``tracker_dir``) or ``runner.train(..., trackers=[WandbTracker(...)])``
from Python; a class of your own only needs `Tracker`'s ``log_values`` (and ``start`` for the
config). Neither package is a dependency: ``pip install aroma-jax[wandb]`` / ``[mlflow]``.
A resumed run continues the same tracker run (its id is kept in ``DIR/trackers.json``).
Offline use: W&B with ``WANDB_MODE=offline`` (files under ``tracker_dir``/wandb), MLflow with a
local ``tracker_dir`` (a file store: MLflow 3 asks for ``MLFLOW_ALLOW_FILE_STORE=true``).
"""

from __future__ import annotations

import abc
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

NAMES = ("wandb", "mlflow")
IDS = "trackers.json"  # DIR/trackers.json: each tracker's run id, for --resume


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """A metrics record's finite numbers as ``split/name`` tags (TensorBoard's, the trackers')."""
    split = record.get("split", "train")
    return {
        f"{split}/{k}": float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)
    }


def module_values(paths: Sequence[str], infos: Sequence[Any]) -> dict[int, dict[str, float]]:
    """Step -> ``{"eq5/<module>": rho_in, "eq6/<module>": rho_out}`` of the host `StepInfo`s:
    eq. 5 at the steps an inner check ran, eq. 6 at outer steps (finite values only: a module
    that was not checked, or is done, has none)."""
    out: dict[int, dict[str, float]] = {}
    for info in infos:
        values = {}
        for flag, name, ratios in (
            (info.checked, "eq5", info.rho_in),
            (info.outer, "eq6", info.rho_out),
        ):
            if bool(flag):
                for path, v in zip(paths, ratios.tolist(), strict=True):
                    if math.isfinite(v):
                        values[f"{name}/{path}"] = float(v)
        if values:
            out[int(info.step)] = values
    return out


class Tracker(abc.ABC):
    """One experiment tracker, as the runner calls it: a subclass implements ``log_values``;
    ``start`` and ``finish`` are optional (a tracker with nothing to open or close keeps
    these no-ops), and ``log`` / ``window`` turn records and windows into ``log_values``."""

    name = "tracker"

    def start(self, config: Mapping[str, Any], out: Path, resume: bool) -> None:  # noqa: B027
        """Opens the tracker run with the resolved config (``resume``: continue the earlier)."""

    @abc.abstractmethod
    def log_values(self, step: int, values: Mapping[str, float]) -> None:
        """Logs scalar ``values`` (``tag -> number``) at ``step``."""

    def log(self, record: Mapping[str, Any]) -> None:
        """A metrics.jsonl record's finite numbers (`scalars`) at its step."""
        values = scalars(record)
        if values:
            self.log_values(int(record.get("step", 0)), values)

    def window(self, loop: Any, infos: Sequence[Any]) -> None:
        """A synced window's eq. 5 / eq. 6 ratios per module (`module_values`), step by step."""
        for step, values in module_values(loop.trainer.paths, infos).items():
            self.log_values(step, values)

    def finish(self, status: str) -> None:  # noqa: B027
        """Closes the tracker run: ``finished``, ``interrupted`` or ``failed``."""


def _saved_id(out: Path, name: str) -> str | None:
    try:
        return json.loads((out / IDS).read_text()).get(name)
    except (OSError, ValueError):
        return None


def _save_id(out: Path, name: str, run_id: str) -> None:
    from aroma_jax.train.checkpoint import write_text_atomic

    try:
        ids = json.loads((out / IDS).read_text())
    except (OSError, ValueError):
        ids = {}
    ids[name] = run_id
    write_text_atomic(out / IDS, json.dumps(ids, indent=2))


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"train.trackers names {extra}, but the {module!r} package is not installed: "
            f"pip install 'aroma-jax[{extra}]'"
        ) from None


class WandbTracker(Tracker):
    """Weights & Biases: one W&B run per run directory (``WANDB_MODE=offline`` works offline).

    ``init_kwargs`` go to ``wandb.init`` (entity, tags, mode, ...).
    """

    name = "wandb"

    def __init__(
        self,
        project: str | None = None,
        run_name: str | None = None,
        directory: str | None = None,
        **init_kwargs: Any,
    ):
        self.project, self.run_name, self.directory = project, run_name, directory
        self.init_kwargs = init_kwargs
        self.run: Any = None

    def start(self, config: Mapping[str, Any], out: Path, resume: bool) -> None:
        wandb = _require("wandb", "wandb")
        run_id = _saved_id(out, self.name) if resume else None
        if self.directory is not None:
            Path(self.directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project or "aroma-jax",
            name=self.run_name or out.name,
            dir=self.directory,
            config=dict(config),
            id=run_id,
            resume="allow" if run_id else None,
            **self.init_kwargs,
        )
        _save_id(out, self.name, self.run.id)

    def log_values(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def finish(self, status: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status in ("finished", "interrupted") else 1)
            self.run = None


_KEY = re.compile(r"[^\w\-./ ]")  # MLflow's allowed key characters


class MlflowTracker(Tracker):
    """MLflow: one MLflow run per run directory, in experiment ``project`` at ``tracking_uri``
    (a local directory is a file store; null: MLflow's default, ``MLFLOW_TRACKING_URI``).

    The config goes in twice: flattened as params (``train.batch_size``, values cut to MLflow's
    length limit) and whole as the artifact ``config.json``.
    """

    name = "mlflow"
    MAX_PARAM = 6000  # MLflow's limit on a param value's length

    def __init__(
        self,
        project: str | None = None,
        run_name: str | None = None,
        tracking_uri: str | None = None,
    ):
        self.project, self.run_name, self.tracking_uri = project, run_name, tracking_uri
        self.client: Any = None
        self.run_id: str | None = None

    def start(self, config: Mapping[str, Any], out: Path, resume: bool) -> None:
        tracking = _require("mlflow.tracking", "mlflow")
        entities = _require("mlflow.entities", "mlflow")
        uri = self.tracking_uri
        if uri is not None and "://" not in uri:
            uri = Path(uri).absolute().as_uri()  # a directory: a local file store
        self.client = tracking.MlflowClient(uri)
        run_id = _saved_id(out, self.name) if resume else None
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        name = self.project or "aroma-jax"
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=self.run_name or out.name).info.run_id
        _save_id(out, self.name, self.run_id)
        params = [entities.Param(k, str(v)[: self.MAX_PARAM]) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_dict(self.run_id, dict(config), "config.json")

    def log_values(self, step: int, values: Mapping[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_KEY.sub("_", k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def finish(self, status: str) -> None:
        if self.run_id is not None:
            final = {"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
            self.client.set_terminated(self.run_id, status=final)
            self.run_id = None


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for section, values in config.items():
        if isinstance(values, Mapping):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return out


def from_config(train: Any) -> list[Tracker]:
    """The trackers ``train.trackers`` names (a `TrainConfig`), with the ``tracker_*`` options."""
    project, name, where = train.tracker_project, train.tracker_run_name, train.tracker_dir
    made: list[Tracker] = []
    for tracker in train.trackers:
        if tracker == "wandb":
            made.append(WandbTracker(project, name, where))
        else:
            made.append(MlflowTracker(project, name, where))
    return made


class Trackers:
    """The run's trackers together: the runner's one sink for records, windows and the end.

    It holds `Tracker`s and passes each call on to those that started (not a `Tracker`
    itself: it has no values of its own to log). ``trackers`` may grow until `start`.
    """

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)
        self.started: list[Tracker] = []

    def start(self, config: Mapping[str, Any], out: Path, resume: bool) -> None:
        for tracker in self.trackers:
            tracker.start(config, out, resume)
            self.started.append(tracker)

    def log(self, record: Mapping[str, Any]) -> None:
        for tracker in self.started:
            tracker.log(record)

    def window(self, loop: Any, infos: Sequence[Any]) -> None:
        for tracker in self.started:
            tracker.window(loop, infos)

    def finish(self, status: str) -> None:
        started, self.started = self.started, []
        for tracker in started:
            tracker.finish(status)


__all__ = [
    "NAMES",
    "MlflowTracker",
    "Tracker",
    "Trackers",
    "WandbTracker",
    "from_config",
    "module_values",
    "scalars",
]
