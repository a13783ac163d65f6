"""The run's best checkpoint by a validation metric (``train.keep_best``), kept beside final/.

At every validation evaluation during training (every ``train.eval_every`` steps, the last step
included when it falls on that schedule; step 0's, of the untrained model, is the run's
"before" and no candidate) the chosen metric is compared with the best so far; when it is
higher (every metric the tasks report is a score, higher is better; a tie keeps the earlier
step, a NaN never wins) that step becomes the run's best result:

    DIR/best/               the adapters of that step, finalized as at the end of a run
                            (`AromaTrainer.finalize`), shaped like final/ and written the same
                            way (`artifacts.save_final`: atomically, with integrity.json, whose
                            ``best`` names the metric, step and value)
    DIR/checkpoints-best/   that step's full training state (one orbax checkpoint, kept until a
                            better step replaces it): what ``aroma-jax finalize --which best``
                            rebuilds a damaged best/ from

Selection reads the ``validation`` split only; the test split is evaluated once, after training,
for final/ and for best/ (``summary.json``'s ``best.metrics``). The best so far travels in every
checkpoint's meta, so a resumed run continues the same selection.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aroma_jax.core import sharding
from aroma_jax.core.config import ConfigError

DIR = "best"
CHECKPOINTS = "checkpoints-best"
WHICH = ("final", "best")


def reported_metrics(pipe: Any) -> tuple[str, ...]:
    """The names a pipeline's validation evaluation reports (what ``keep_best`` may name)."""
    task = pipe.task
    if pipe.kind == "instruction":  # commonsense: per-set accuracy and their mean
        sets = sorted({str(s) for s in task.splits["validation"]["set"]})
        return (*sets, "average")
    if pipe.arch == "llama" and pipe.kind != "generation":  # classification as text
        return ("mc_accuracy",)
    return tuple(task.metrics)


def check_metric(cfg: Any, pipe: Any) -> str | None:
    """``train.keep_best`` if the task reports it on validation; a one-line error otherwise."""
    metric = cfg.train.keep_best
    if metric is None:
        return None
    names = reported_metrics(pipe)
    if metric not in names:
        raise ConfigError(
            f"invalid train.keep_best={metric!r}: task {cfg.task.name!r} reports "
            f"{', '.join(names)} on its validation split; accepted one of those, or null"
        )
    return metric


class BestKeeper:
    """Tracks the best validation value of one metric and writes best/ when it improves.

    ``record`` (metric, mode, step, value) is what the checkpoints' meta and summary.json hold;
    ``restore`` takes it back from a checkpoint's meta on resume.
    """

    def __init__(self, metric: str, out: Path, trainer: Any, label_names: tuple[str, ...]):
        from aroma_jax.train.checkpoint import CheckpointManager

        self.metric, self.out, self.trainer, self.names = metric, out, trainer, label_names
        self.step: int | None = None
        self.value: float | None = None
        self.validation: dict = {}
        self.ckpt = CheckpointManager(out / CHECKPOINTS, keep=1, save_every=1)

    def record(self) -> dict | None:
        if self.step is None:
            return None
        return {
            "metric": self.metric,
            "mode": "max",
            "step": self.step,
            "value": self.value,
            "validation_metrics": self.validation,
        }

    def restore(self, saved: Mapping[str, Any] | None) -> None:
        """The best so far from a checkpoint's meta (None: no evaluation had improved yet)."""
        if saved and saved.get("metric") == self.metric:
            self.step, self.value = int(saved["step"]), float(saved["value"])
            self.validation = dict(saved.get("validation_metrics", {}))

    def consider(self, step: int, state: Any, metrics: Mapping[str, float]) -> bool:
        """Keeps ``state`` as the best if its validation ``metrics`` improve the best so far."""
        value = float(metrics[self.metric])
        if not math.isfinite(value) or (self.value is not None and value <= self.value):
            return False
        self.step, self.value, self.validation = step, value, dict(metrics)
        self.save(state)
        return True

    def save(self, state: Any) -> None:
        """The step's full state into checkpoints-best/, then its finalized adapters into
        best/ (the checkpoint first: a crash between the two leaves best/ rebuildable)."""
        from aroma_jax.train.artifacts import save_final

        record = self.record()
        self.ckpt.save(self.step, state, {"data": {"step": self.step}, "best": record}, force=True)
        final = self.trainer.finalize(state)
        final = final._replace(
            adapters=sharding.to_host(final.adapters),
            extra=sharding.to_host(final.extra),
            ctrl=sharding.to_host(final.ctrl),
        )
        if sharding.is_writer():
            save_final(self.out / DIR, self.trainer, final, self.names, self.step, best=record)

    def test_metrics(self, target: Any, evaluate: Any) -> dict:
        """``evaluate(state)`` of the best step's finalized state (restored from its checkpoint
        onto ``target``); called once, after training."""
        state, _ = self.ckpt.restore(target)
        return evaluate(self.trainer.finalize(state))

    def close(self) -> None:
        self.ckpt.close()


def clear(out: Path) -> None:
    """Removes the best/ and checkpoints-best/ of an earlier attempt that left no checkpoint
    (a run started from step 0 selects anew)."""
    if sharding.is_writer():
        for name in (DIR, CHECKPOINTS):
            shutil.rmtree(out / name, ignore_errors=True)
    sharding.barrier("aroma-best-cleared")


def check_which(run_dir: Path, which: str) -> Path:
    """``run_dir/final`` or ``run_dir/best``; a clear error if best/ was never kept."""
    if which not in WHICH:
        raise ValueError(f"invalid --which {which!r}: accepted {', '.join(WHICH)}")
    path, ckpts = Path(run_dir) / which, Path(run_dir) / CHECKPOINTS
    kept = ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())
    if which == DIR and not path.exists() and not kept:
        raise FileNotFoundError(
            f"run {str(run_dir)!r} kept no best checkpoint (train.keep_best was not set, or no "
            "validation evaluation ran): use --which final, or train with "
            "--set train.keep_best=<metric>"
        )
    return path


__all__ = [
    "CHECKPOINTS",
    "DIR",
    "WHICH",
    "BestKeeper",
    "check_metric",
    "check_which",
    "clear",
    "reported_metrics",
]
