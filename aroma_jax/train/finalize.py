"""``aroma-jax finalize RUN_DIR``: rebuild a finished run's ``final/`` from its last checkpoint.

A finished run saves its last state as a checkpoint before it finalizes it (`runner.train`), so
``final/`` can always be recomputed: restore the latest checkpoint (verified against its
fingerprints), `AromaTrainer.finalize` it as the run did, and write ``final/`` atomically with
new fingerprints (`artifacts.save_final`). The result is the run's own ``final/``, byte for
byte (tests/train/test_integrity.py). Only a finished run is finalized: an interrupted one is
resumed instead, and a checkpoint older than the run's last step (the last one damaged) is
refused rather than turned into adapters that were never the run's result.

``--which best`` rebuilds ``best/`` (`aroma_jax.train.best`) the same way from
``checkpoints-best/``, the full state of the step ``summary.json``'s ``best`` names.
"""

from __future__ import annotations

import json
from pathlib import Path

from aroma_jax.core.train_step import AromaTrainer
from aroma_jax.train import best, lock, run_config
from aroma_jax.train.artifacts import save_final
from aroma_jax.train.pipeline import build_pipeline, class_names


def finalize_run(run_dir: str | Path, break_lock: bool = False, which: str = "final") -> Path:
    """Rewrites ``run_dir/final`` from the run's latest checkpoint (``which="best"``:
    ``run_dir/best`` from its checkpoint); returns its path."""
    from aroma_jax.train.checkpoint import CheckpointError, CheckpointManager

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{str(run_dir)!r} is not a run directory (no config.yaml): accepted a directory "
            "written by `aroma-jax train --output DIR`"
        )
    resume = f"`aroma-jax train --config {run_dir / 'config.yaml'} --output {run_dir} --resume`"
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    if summary.get("status") != "finished":
        state = summary.get("status") or "no readable summary.json"
        raise RuntimeError(
            f"run {str(run_dir)!r} is not finished ({state}): finalize rebuilds the adapters of "
            f"a finished run; finish this one with {resume}"
        )
    record = None
    if which == best.DIR:
        best.check_which(run_dir, which)
        record = {k: v for k, v in (summary.get("best") or {}).items() if k != "metrics"}
        if not record:
            raise FileNotFoundError(
                f"run {str(run_dir)!r} names no best step in its summary.json (no validation "
                "evaluation ran): there is no best/ to rebuild; use --which final"
            )
    elif which != "final":
        best.check_which(run_dir, which)  # the error lists the accepted values
    with lock.hold(run_dir, "finalize", break_lock):
        cfg = run_config.load_run(run_dir)
        pipe = build_pipeline(cfg)
        trainer = AromaTrainer(
            pipe.loss_fn, pipe.params, pipe.aroma, donate=False, stacked=pipe.stacked
        )
        ckpts = run_dir / ("checkpoints" if record is None else best.CHECKPOINTS)
        if not ckpts.is_dir():
            raise CheckpointError(
                f"run {str(run_dir)!r} has no checkpoints/ left to rebuild final/ from: "
                f"train it again ({resume} without --resume, into a new --output)"
            )
        keep = cfg.train.keep_checkpoints if record is None else 1
        mgr = CheckpointManager(ckpts, keep=keep)
        try:
            state, meta = mgr.restore(trainer.init(pipe.params))
        finally:
            mgr.close()
        step = int(meta["data"]["step"])
        want = summary.get("steps") if record is None else record["step"]
        if want is not None and step != int(want):
            ended = "finished at" if record is None else "kept best/ of"
            raise CheckpointError(
                f"the latest readable checkpoint of {str(ckpts)!r} is step {step}, but the run "
                f"{ended} step {want}: that checkpoint is damaged, so {which}/ cannot be "
                "rebuilt as it was; train the run again into a new --output"
            )
        final = trainer.finalize(state)
        return save_final(
            run_dir / which, trainer, final, class_names(pipe), step, best=record or None
        )


__all__ = ["finalize_run"]
