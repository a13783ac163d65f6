"""``aroma-jax train``: fine-tune an HF Flax model with AROMA (or LoRA/ReLoRA) from a run config.

A run directory holds everything a user needs afterwards::

    DIR/config.yaml        the resolved config (every default filled in)
    DIR/metrics.jsonl      one JSON record per log interval and per evaluation
    DIR/history.json       every inner check and outer step per module
    DIR/summary.json       final metrics, ranks, parameter counts, wall time, compiles
    DIR/tb/                TensorBoard logs
    DIR/plots/             rank_growth.png (paper fig. 1), rank_map.png (paper fig. 3)
    DIR/checkpoints/       orbax checkpoints (resume with --resume)

The data order is a pure function of (seed, step), so a resumed run sees exactly the batches the
uninterrupted run would have seen.

Multi-process runs (TPU pod slices, several GPU nodes; see docs/SHARDING.md): `train` starts JAX's
distributed runtime from the environment first, each process feeds only its rows of every global
batch, evaluation runs on all processes alike, process 0 alone writes the run directory's files
(`sharding.is_writer`) and every process takes part in each orbax checkpoint.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from aroma_jax.core import sharding
from aroma_jax.core.adapters import adapter_param_count
from aroma_jax.core.history import History
from aroma_jax.core.train_step import AromaTrainer, StepInfo, TrainState
from aroma_jax.models.native.partitioning import step_context
from aroma_jax.train import best as best_lib
from aroma_jax.train import lock, memory, plots, run_config, throughput
from aroma_jax.train import trackers as trackers_lib
from aroma_jax.train.hooks import Hook, OuterHook, TrainLoop
from aroma_jax.train.input import BatchStream, batch_at  # noqa: F401  (batch_at: re-exported)
from aroma_jax.train.pipeline import Pipeline, build_pipeline, class_names, with_label_names
from aroma_jax.train.run_config import RunConfig


class TrainingError(RuntimeError):
    """Training stopped on bad numerics or bad input; the message says where and why."""


def write_atomic(path: Path, text: str) -> None:
    """Writes a file so that readers see the old or the new content, never half of it."""
    from aroma_jax.train.checkpoint import write_text_atomic

    write_text_atomic(path, text)


def prepare_run_dir(output: str | Path, resume: bool) -> Path:
    out = Path(output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # processes of one run share ``out``
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise TrainingError(
            f"cannot write to output directory {str(out)!r}: {err.strerror or err}. "
            "Choose a writable --output directory."
        ) from err
    ckpts = out / "checkpoints"
    if not resume and ckpts.exists() and any(ckpts.iterdir()):
        raise TrainingError(
            f"{str(out)!r} already holds a run with checkpoints: pass --resume to continue it, "
            "or choose a new --output directory"
        )
    return out


class _Interrupt:
    """Turns the first Ctrl-C into a flag so the loop can checkpoint and exit cleanly."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.hit:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.hit = True

        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class MetricsLog:
    """metrics.jsonl plus TensorBoard scalars and the run's trackers (``sink``); ``enabled=False``
    (processes other than 0 of a multi-process run) writes nothing."""

    def __init__(self, out: Path, enabled: bool = True, sink: Any = None):
        self.path = out / "metrics.jsonl"
        self.enabled, self.sink = enabled, sink
        self._tb = None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(out / "tb"))
        except ImportError:  # TensorBoard logs are optional
            self._tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for tag, v in trackers_lib.scalars(record).items():
                self._tb.add_scalar(tag, v, record.get("step", 0))
        if self.sink is not None:
            self.sink.log(record)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _pair_size(pair) -> int:
    """Trained entries of a pair, DoRA's magnitude and AdaLoRA's singular values included."""
    return sum(int(x.size) for x in jax.tree.leaves(pair))


def _trainable_now(trainer: AromaTrainer, state: TrainState, head: int) -> int:
    done = sharding.to_host(state.adapters.done)
    # A stacked module's pair spans its layers: each layer not done trains its share.
    return head + sum(
        _pair_size(p) * int((~np.asarray(done[k])).sum()) // max(np.asarray(done[k]).size, 1)
        for k, p in state.adapters.pairs.items()
    )


class _RunHooks:
    """The runner's built-in hooks (`aroma_jax.train.hooks`) and the state they share: the
    step infos not yet on the host, the losses of the log window, the latest evaluation."""

    def __init__(self, loop, pipe, cfg, history, ckpt, log, unlogged, head_params, out, at):
        self.loop, self.pipe, self.cfg, self.history = loop, pipe, cfg, history
        self.ckpt, self.log, self.out, self.interrupt_at = ckpt, log, out, at
        self.unlogged: list[float] = unlogged  # losses of the log window so far
        self.head_params = head_params
        self.pending: list[StepInfo] = []
        self.finished = False  # the latest logged window ended the run
        self.last_eval: dict = {}
        self.clock = _StepClock()
        self.bar = None
        self.signal: _Interrupt | None = None
        self.best: best_lib.BestKeeper | None = None  # train.keep_best

    def meta(self, step: int) -> dict:
        return {
            "data": {"step": step},
            "history": _history_dict(self.history),
            "unlogged_losses": list(self.unlogged),
            "best": self.best.record() if self.best is not None else None,
        }

    def sync(self, write: bool = True) -> bool:
        """Moves pending step infos to the history; ``write``: also log the window so far.

        Records are written only at multiples of ``log_every`` (and at the end), so a run resumed
        at step 161 logs at 170, 180, ... like an uninterrupted one; a window cut by a save or an
        interrupt carries its losses (``unlogged``, kept in the checkpoint meta) to its record.
        A non-finite loss stops the run here (the NaN stop), before anything is written.
        """
        if not self.pending:
            return False
        infos = sharding.to_host(self.pending)
        self.history.extend(infos)
        outer_now = any(bool(i.outer) for i in infos)
        last = infos[-1]
        losses = [float(i.loss) for i in infos]
        self.unlogged = self.unlogged + losses
        bad = [int(i.step) for i, v in zip(infos, losses, strict=True) if not math.isfinite(v)]
        if bad:
            raise TrainingError(
                f"loss became {losses[-1]} at step {bad[0]}; stopped. The last good checkpoint "
                f"(step {self.ckpt.latest_step()}) is kept in {str(self.out / 'checkpoints')!r}. "
                "Lower optimizer.learning_rate or check the data."
            )
        self.pending = []
        self.loop.window_event(infos)  # before the record: trackers see steps in order
        if write:
            self._write_record(last)
        if outer_now:
            self.loop.outer_event(infos)
        return bool(last.finished)

    def _write_record(self, last: StepInfo) -> None:
        loop = self.loop
        record = {
            "step": int(last.step),
            "split": "train",
            "loss": float(np.mean(self.unlogged)),
            "lr": float(last.lr),
            "total_rank": int(np.sum(last.ranks)),
            "trainable_params": _trainable_now(loop.trainer, loop.state, self.head_params),
            "outer_steps": len(self.history.outer_step_numbers()),
        }
        self.log.write(record)
        self.unlogged = []
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                rank=record["total_rank"],
                trainable=record["trainable_params"],
            )

    # The hooks, in the order the runner adds them.
    def collect(self, loop: TrainLoop) -> None:
        """Every step: keep the step's info (on the device) and advance the progress bar."""
        self.pending.append(loop.info)
        self.finished = False
        if self.bar is not None:
            self.bar.update(1)

    def log_window(self, loop: TrainLoop) -> None:
        """Every ``log_every`` steps and at the last: metrics.jsonl and TensorBoard."""
        self.finished = self.sync()

    def start_clock(self, loop: TrainLoop) -> None:
        if not self.pending and self.clock.start is None:  # first sync: compiled and warm
            self.clock.begin(loop.step)

    def checkpoint(self, loop: TrainLoop) -> None:
        """Every ``save_every`` steps."""
        self.sync(write=False)
        with self.clock.paused():
            self.ckpt.save(loop.step, loop.state, self.meta(loop.step))

    def checkpoint_outer_step(self, loop: TrainLoop, infos: Sequence[StepInfo]) -> None:
        """At every synced outer step: a checkpoint, so an outer step's work is never lost."""
        step = int(infos[-1].step)
        self.ckpt.save(step, loop.state, self.meta(step), force=True)

    def evaluate(self, loop: TrainLoop) -> None:
        """Every ``eval_every`` steps, unless this step's window ended the run (with keep_best
        that step is evaluated too: it may be the best)."""
        if self.finished and self.best is None:
            return
        with self.clock.paused():
            self.last_eval = _evaluate(self.pipe, loop.trainer, loop.state, "validation", self.cfg)
            self.log.write({"step": loop.step, "split": "validation", **self.last_eval})
            if self.best is not None:
                self.best.consider(loop.step, loop.state, self.last_eval)

    def interrupt(self, loop: TrainLoop) -> None:
        """Ctrl-C (or ``interrupt_at``): checkpoint and stop."""
        if (self.signal is not None and self.signal.hit) or loop.step == self.interrupt_at:
            self.sync(write=False)
            self.ckpt.save(loop.step, loop.state, self.meta(loop.step), force=True)
            loop.stop("interrupted")

    def finish(self, loop: TrainLoop) -> None:
        """Stop once the logged window says the run finished (every module done, or max)."""
        if self.finished:
            done = sharding.to_host(loop.state.adapters.done)
            all_done = all(bool(np.all(d)) for d in done.values())
            all_done = all_done and loop.trainer.cfg.plugin.trains_adapters
            loop.stop("all_modules_done" if all_done else "max_steps")


def train(
    cfg: RunConfig,
    output: str | Path,
    resume: bool = False,
    interrupt_at: int | None = None,
    break_lock: bool = False,
    profile: str | tuple[int, int] | None = None,
    hooks: Sequence[Hook] = (),
    outer_hooks: Sequence[OuterHook] = (),
    trackers: Sequence[trackers_lib.Tracker] = (),
) -> dict:
    """Runs one training job; returns the summary (also written to ``summary.json``).

    The run directory is locked for the whole run (`aroma_jax.train.lock`; process 0 of a
    multi-process run holds it): a second writer is refused, ``break_lock`` takes over a lock
    left by another host. ``resume`` with no checkpoint in ``output`` says so on stderr and
    starts a new run. ``interrupt_at`` behaves as if Ctrl-C arrived right after that step (for
    tests and drills). ``profile``: ``"START:STOP"`` writes a JAX profiler trace of steps
    START+1..STOP into ``DIR/profile`` (`throughput.Profiler`). ``hooks`` run after the built-in
    metrics, checkpoint and eval hooks of a step, before the interrupt and finish checks;
    ``outer_hooks`` get each synced window with an outer step (`aroma_jax.train.hooks`).
    ``trackers`` (`aroma_jax.train.trackers`, e.g. ``WandbTracker(project=...)``) join those
    ``train.trackers`` names; process 0 alone feeds them.
    """
    sharding.initialize_distributed()  # before anything touches devices (the lock asks for
    # the process index); once per process
    out = prepare_run_dir(output, resume=True)  # created and writable; its checks come locked
    with lock.hold(out, "train --resume" if resume else "train", break_lock):
        if resume and not has_checkpoint(out):
            say(
                f"aroma-jax train: --resume: nothing to resume in {str(out)!r} (no checkpoint); "
                "starting a new run"
            )
            resume = False
        sink = trackers_lib.Trackers(trackers)
        try:
            return _train(cfg, out, resume, interrupt_at, profile, hooks, outer_hooks, sink)
        except BaseException:
            sink.finish("failed")
            raise


def has_checkpoint(out: Path) -> bool:
    """Whether ``out/checkpoints`` holds a finished checkpoint step (orbax names them by step)."""
    ckpts = out / "checkpoints"
    return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())


def say(line: str) -> None:
    """One line of the run's own account, on stderr (stdout carries the summary JSON)."""
    print(line, file=sys.stderr, flush=True)


def _train(
    cfg: RunConfig,
    out: Path,
    resume: bool,
    interrupt_at: int | None,
    profile: str | tuple[int, int] | None,
    hooks: Sequence[Hook],
    outer_hooks: Sequence[OuterHook],
    sink: trackers_lib.Trackers,
) -> dict:
    from aroma_jax.train.checkpoint import CheckpointManager

    t0 = time.perf_counter()
    writer = sharding.is_writer()
    window = profile if isinstance(profile, tuple) else throughput.parse_window(profile)
    prepare_run_dir(out, resume)  # refuses a fresh run over another run's checkpoints
    if resume and (out / "config.yaml").is_file():
        cfg = run_config.adopt_legacy(cfg, yaml.safe_load((out / "config.yaml").read_text()) or {})
    pipe: Pipeline = build_pipeline(cfg)
    keep_best = best_lib.check_metric(cfg, pipe)  # a metric the task reports, before any write
    batch_at(pipe.train_arrays, cfg.train.batch_size, 0, 0)  # fewer rows than a batch?
    cfg = with_label_names(cfg, pipe)  # the class order of text labels, kept in config.yaml
    aroma = pipe.aroma
    resolved = run_config.to_plain(cfg, aroma)
    if resume:
        check_resume_config(out / "config.yaml", resolved)
    sharding.barrier("aroma-config-read")  # all have read the run's config before it is rewritten
    if writer:
        write_atomic(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    tcfg = cfg.train
    if writer:
        sink.trackers += trackers_lib.from_config(tcfg)
        sink.start(resolved, out, resume)

    trainer = AromaTrainer(
        pipe.loss_fn,
        pipe.params,
        aroma,
        stacked=pipe.stacked,
        grad_accum=tcfg.grad_accum,
        loss_weight=pipe.loss_weight,
    )
    head_params = sum(int(x.size) for x in jax.tree.leaves(trainer_extra(pipe, trainer)))
    memory.check_run(cfg, pipe, trainer)  # refuse now rather than be killed mid-run
    if writer:
        say(f"config: {out / 'config.yaml'}")
        say(head_line(cfg, pipe, head_params))
    state = trainer.init(pipe.params)
    if cfg.model.init_adapter:  # a resumed checkpoint overwrites it below
        from aroma_jax.train import peft_import

        state = peft_import.load_for_run(trainer, state, pipe.arch, cfg.model.init_adapter)
    pipe.params = None  # the state owns the buffers now (the step donates them)
    mesh = None
    if cfg.mesh:
        mesh = sharding.parse_mesh(cfg.mesh)
        state = sharding.shard_trainer(trainer, state, mesh, sharding.rules_for(pipe.arch))
    elif jax.process_count() > 1:
        raise TrainingError(
            f"a run of {jax.process_count()} processes needs a mesh over all "
            f"{jax.device_count()} devices: accepted --mesh (or mesh: in the config), e.g. "
            f"--mesh data={jax.process_count()},fsdp={jax.local_device_count()}"
        )
    # XLA:CPU's gloo collectives deadlock when several steps are in flight across processes.
    block_each_step = jax.process_count() > 1 and jax.default_backend() == "cpu"
    history = History(trainer.paths)
    ckpt = CheckpointManager(
        out / "checkpoints", keep=tcfg.keep_checkpoints, save_every=tcfg.save_every
    )
    start = 0
    unlogged: list[float] = []  # losses of the log window so far (synced, not yet written)
    saved_best = None  # train.keep_best: the best so far when the checkpoint was written
    if resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        start = int(meta["data"]["step"])
        _restore_history(history, meta.get("history", {}))
        unlogged = [float(x) for x in meta.get("unlogged_losses", [])]
        saved_best = meta.get("best")
        if writer:
            drop_records_after(out / "metrics.jsonl", start)
    if start == 0 and writer:  # records of an earlier attempt that left no checkpoint
        drop_records_after(out / "metrics.jsonl", -1)
    best = None
    if keep_best is not None:
        if start == 0:
            best_lib.clear(out)
        best = best_lib.BestKeeper(keep_best, out, trainer, class_names(pipe))
        best.restore(saved_best)
    log = MetricsLog(out, enabled=writer, sink=sink)
    entry_pairs = trainer.unstacked(state.adapters).pairs
    pair_sizes = {p: _pair_size(entry_pairs[p]) for p in trainer.paths}
    initial_metrics: dict = {}
    if tcfg.eval_at_start and start == 0:
        initial_metrics = _evaluate(pipe, trainer, state, "validation", cfg)
        log.write({"step": 0, "split": "validation", **initial_metrics})
    if bool(sharding.to_host(state.ctrl.finished)):
        start = max(start, int(sharding.to_host(state.ctrl.step)))
        already_done = True
    else:
        already_done = False
    profiler = throughput.Profiler(window, out / "profile", enabled=writer)
    batches = BatchStream(
        pipe.train_arrays,
        tcfg.batch_size,
        tcfg.seed,
        mesh,
        start,
        aroma.max_steps,
        prefetch=tcfg.prefetch,
    )

    def next_batch(step_now: int) -> Any:
        fed, batch = next(batches)
        assert fed == step_now, (fed, step_now)  # the stream follows the loop's step
        return batch

    def run_step(state_now: TrainState, batch: Any) -> tuple[TrainState, StepInfo]:
        profiler.before(loop.step)
        with step_context(pipe.model, mesh):  # a native model's activation sharding rules
            if block_each_step:
                # gloo gives a peer 30 s to join a collective's first run: compile first (jit
                # reuses it), then start every step together.
                if loop.step == start:
                    trainer.compile_step(state_now, batch)
                sharding.barrier(f"aroma-step-{loop.step}")
            state_now, info = trainer.step(state_now, batch)
        if block_each_step:
            jax.block_until_ready(info)
        profiler.after(loop.step + 1, info)
        return state_now, info

    loop = TrainLoop(trainer, state, next_batch, start, aroma.max_steps, step_fn=run_step)
    run = _RunHooks(loop, pipe, cfg, history, ckpt, log, unlogged, head_params, out, interrupt_at)
    run.bar = _progress(tcfg.progress and writer, aroma.max_steps, start)
    run.best = best
    loop.add_hook(run.collect, name="progress")
    loop.add_hook(run.log_window, tcfg.log_every, at_last_step=True, name="metrics")
    loop.add_hook(run.start_clock, name="clock")
    loop.add_hook(run.checkpoint, tcfg.save_every, name="checkpoint")
    loop.add_hook(run.evaluate, tcfg.eval_every, name="eval")
    for hook in hooks:
        loop.add_hook(hook)
    loop.add_hook(run.interrupt, name="interrupt")
    loop.add_hook(run.finish, name="finish")
    loop.add_outer_hook(run.checkpoint_outer_step)  # never lose an outer step's work
    loop.add_window_hook(sink.window)
    for fn in outer_hooks:
        loop.add_outer_hook(fn)
    if already_done:
        loop.stopped = "all_modules_done"
    with _Interrupt() as run.signal, profiler.guard():
        stopped = loop.run() or "max_steps"
        run.sync()
    state, step, last_eval, clock, bar = loop.state, loop.step, run.last_eval, run.clock, run.bar
    step_ms = clock.ms_per_step(step)  # before the final checkpoint, merge and test eval
    if bar is not None:
        bar.close()
    if stopped == "interrupted":
        log.close()
        summary = {
            "status": "interrupted",
            "step": step,
            "resume": f"aroma-jax train --config {out / 'config.yaml'} --output {out} --resume",
        }
        if writer:
            write_atomic(out / "summary.json", json.dumps(summary, indent=2))
        _close(best, sink, "interrupted")
        return summary
    ckpt.save(step, state, run.meta(step), force=True)
    last_pairs = trainer.final_pairs(state) if aroma.grows else {}
    final = trainer.finalize(state)
    # The finalized adapters on validation too: a setting chosen on validation is judged by the
    # model the run delivers, not by the last in-training evaluation (steps earlier, and before
    # finalize merged or dropped the pairs left at T).
    final_validation = _evaluate(pipe, trainer, final, "validation", cfg)
    log.write({"step": step, "split": "validation", "final": True, **final_validation})
    metrics = _evaluate(pipe, trainer, final, "test", cfg)
    log.write({"step": step, "split": "test", **metrics})
    best_record = best.record() if best is not None else None
    if best is not None and best_record is None and writer:
        say("train.keep_best: no validation evaluation during training (or only NaN): no best/")
    if best_record is not None:  # the kept step's test score, once, after selection
        best_record["metrics"] = best.test_metrics(
            state, lambda s: _evaluate(pipe, trainer, s, "test", cfg)
        )
    log.close()
    # The adapters, head and controller on every host (a collective), for the files below.
    final = final._replace(
        adapters=sharding.to_host(final.adapters),
        extra=sharding.to_host(final.extra),
        ctrl=sharding.to_host(final.ctrl),
    )
    ranks = trainer.ranks(final)
    plots_dir = out / "plots"
    if writer:
        write_atomic(out / "history.json", json.dumps(_history_dict(history)))
        plots.plot_rank_growth(
            history,
            pair_sizes,
            plots_dir / "rank_growth.png",
            head_params,
            title=f"{aroma.method}: rank and trainable parameters",
        )
        plots.plot_rank_map(ranks, plots_dir / "rank_map.png")
    summary = {
        "status": "finished",
        "stopped": stopped,
        "method": aroma.method,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "metrics": metrics,
        "validation_metrics": last_eval,
        "final_validation_metrics": final_validation,
        "initial_validation_metrics": initial_metrics,
        "ranks": ranks,
        "total_rank": int(sum(ranks.values())),
        "adapter_params": adapter_param_count(state.adapters),
        "final_adapter_params": int(
            sum(
                (trainer.entry_specs[p].fan_in + trainer.entry_specs[p].fan_out) * r
                for p, r in ranks.items()
            )
        ),
        "head_params": head_params,
        "outer_steps": len(history.outer_step_numbers()),
        "inner_loops": history.inner_loop_endings(),
        **rank_report(ranks, history, last_pairs),
        "rank_capacity": aroma.rank_capacity,  # as requested (null: derive it from the run)
        "rank_capacity_derived": aroma.rank_capacity_derived,  # merge slots per module it had
        "capacity_full": history.full_modules(),
        "steps": step,
        "step_ms": step_ms,
        "throughput": throughput.report(
            step_ms,
            tcfg.batch_size,
            cfg.task.max_len,
            throughput.model_flops(pipe.arch, pipe.model.config, tcfg.batch_size, cfg.task.max_len),
            cfg.model.dtype,
        ),
        "profile": str(out / "profile") if window else None,
        "wall_s": round(time.perf_counter() - t0, 2),
        "compiles": trainer.compiles,
        "processes": jax.process_count(),
        "plots": [str(plots_dir / "rank_growth.png"), str(plots_dir / "rank_map.png")],
    }
    if best is not None:
        summary["best"] = best_record  # None: no validation evaluation ran
    if writer:
        _save_adapters(out, trainer, final, class_names(pipe), step)  # before "finished" is said
        write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    sharding.barrier("aroma-run-written")  # no process reports success before the files exist
    _close(best, sink, "finished")
    return summary


def _close(best: best_lib.BestKeeper | None, sink: trackers_lib.Trackers, status: str) -> None:
    if best is not None:
        best.close()
    sink.finish(status)


def rank_report(ranks: Mapping[str, int], history: History, last_pairs: Mapping) -> dict:
    """What the reported ranks are made of (every rank counts only pairs that passed eq. 6):
    ``final_pairs``, what `AromaTrainer.finalize` did with the pairs left at ``max_steps``
    (merged / dropped by eq. 6 / zero); ``eq6_stopped``, the modules eq. 6 ended (during
    training, or by dropping the last pair), with how many ended at each rank; and the
    ``distinct_ranks``."""
    actions = collections.Counter(v["action"] for v in last_pairs.values())
    ended = {r["module"] for r in history.outer_steps if r["action"] == "done"}
    ended |= {e for e, v in last_pairs.items() if v["action"] == "dropped"}
    at_rank = collections.Counter(ranks[e] for e in ended)
    return {
        "final_pairs": {k: actions.get(k, 0) for k in ("merged", "dropped", "zero")},
        "eq6_stopped": {
            "modules": len(ended),
            "during_training": actions.get("stopped", 0),
            "at_rank": {str(r): n for r, n in sorted(at_rank.items())},
        },
        "distinct_ranks": sorted(set(ranks.values())),
    }


RESUME_MAY_CHANGE = (
    "train.progress",
    "train.eval_batch_size",
    "train.prefetch",
    "train.trackers",
    "train.tracker_project",
    "train.tracker_run_name",
    "train.tracker_dir",
    "mesh",
    "train.grad_accum",  # the same gradient, summed in micro-batches (a smaller device)
    "task.streaming",  # the same batches, tokenized per batch or up front
)  # no effect on the state


def check_resume_config(path: Path, resolved: Mapping[str, Any]) -> None:
    """A resumed run must use the config it was started with (another method, model, task or
    schedule would continue someone else's state); only `RESUME_MAY_CHANGE` keys may differ."""
    if not path.exists():
        return
    old = run_config.migrate(yaml.safe_load(path.read_text()) or {})  # runs of older layouts
    new = yaml.safe_load(yaml.safe_dump(dict(resolved), sort_keys=False))

    def flat(cfg: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for section, values in cfg.items():
            items = values.items() if isinstance(values, Mapping) else [("", values)]
            for key, value in items:
                out[f"{section}.{key}" if key else section] = value
        return out

    a, b = flat(old), flat(new)
    # A key the run's config lacks was added later; its default keeps the old behaviour
    # (`run_config.LEGACY_DEFAULTS` covers those whose default does not).
    defaults = flat(run_config.default_plain(new.get("aroma", {}).get("method", "aroma")))
    added = {k for k in b if k not in a and k in defaults and b[k] == defaults[k]}
    # Keys of other methods that a run's config.yaml once listed in full had no effect on it.
    dropped = {k for k in a if k not in b and k.startswith("aroma.")}
    diff = [
        k
        for k in sorted(set(a) | set(b))
        if k not in {*RESUME_MAY_CHANGE, *added, *dropped} and a.get(k) != b.get(k)
    ]
    if diff:
        shown = "; ".join(f"{k}: {a.get(k)!r} in the run, {b.get(k)!r} now" for k in diff[:4])
        more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
        raise TrainingError(
            f"--resume with a config that differs from the run in {str(path.parent)!r}: "
            f"{shown}{more}. Resume with the run's own config (--config {path}), or train "
            "into a new --output directory"
        )


def drop_records_after(path: Path, step: int) -> None:
    """Keeps the metrics records of steps <= ``step`` (a resumed run rewrites the rest, so a run
    killed after its last checkpoint leaves no duplicates)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line cut short by a kill
            continue
    write_atomic(path, "".join(line + "\n" for line in kept))


def trainer_extra(pipe: Pipeline, trainer: AromaTrainer) -> Any:
    from aroma_jax.core.train_step import split_params

    return split_params(pipe.params, trainer.cfg.train_patterns)[1]


def _save_adapters(
    out: Path, trainer: AromaTrainer, state: TrainState, names: tuple[str, ...], step: int
) -> None:
    """The finalized adapters and head (for eval and export), independent of checkpoints."""
    from aroma_jax.train.artifacts import save_final

    save_final(out / "final", trainer, state, names, step)


def head_line(cfg: RunConfig, pipe: Pipeline, head_params: int) -> str:
    """The run's one-line account of its task head (what the model's load notes were about)."""
    kind = pipe.kind
    if pipe.arch in ("llama", "bart") or kind in ("generation", "instruction"):
        return "head: none; the model answers in text through its pretrained LM head (frozen)"
    mode = cfg.train.head
    how = {
        "train": "trained in full",
        "frozen": "frozen at its initialisation",
        "paper": "frozen, its dense layer adapted like the targets",
    }[mode]
    if kind == "regression":
        what = "regression head (1 output)"
    else:
        names = class_names(pipe)
        n = len(names) or int(getattr(pipe.model.config, "num_labels", 0) or 0)
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        what = f"{n}-class classifier" + (f" ({shown})" if names else "")
    return f"head: {what}, {head_params:,} parameters, {how} (train.head={mode})"


class _StepClock:
    """Milliseconds per train step after the first synced window (so the compile is excluded),
    with evaluations and checkpoint writes paused out."""

    def __init__(self):
        self.start: float | None = None
        self.first_step = 0
        self.paused_s = 0.0

    def begin(self, step: int) -> None:
        self.start, self.first_step = time.perf_counter(), step

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def ms_per_step(self, step: int) -> float | None:
        if self.start is None or step <= self.first_step:
            return None
        busy = time.perf_counter() - self.start - self.paused_s
        return round(1000.0 * busy / (step - self.first_step), 2)


def _history_dict(history: History) -> dict:
    return {**history.as_dict(), "steps": history.steps}


def _restore_history(history: History, saved: Mapping[str, Any]) -> None:
    history.inner_checks = list(saved.get("inner_checks", []))
    history.outer_steps = list(saved.get("outer_steps", []))
    history.steps = list(saved.get("steps", []))


def _progress(enabled: bool, total: int, start: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _evaluate(
    pipe: Pipeline, trainer: AromaTrainer, state: TrainState, split: str, cfg: RunConfig
) -> dict:
    return pipe.evaluate(trainer, state, split, cfg.train.eval_batch_size)


def evaluate_only(
    cfg: RunConfig,
    run_dir: str | Path,
    split: str = "test",
    adapter: Path | None = None,
    which: str = "final",
) -> dict:
    """``aroma-jax eval``: metrics of a finished run's ``which`` adapters (final/, or best/ of
    ``train.keep_best``) on a split, or of a PEFT ``adapter`` directory on the run's model and
    task instead."""
    from aroma_jax.train.artifacts import rebuild_state

    pipe = build_pipeline(cfg)
    trainer = AromaTrainer(
        pipe.loss_fn, pipe.params, pipe.aroma, donate=False, stacked=pipe.stacked
    )
    if adapter is not None:
        from aroma_jax.train import peft_import

        state = peft_import.load_for_run(trainer, trainer.init(pipe.params), pipe.arch, adapter)
    else:
        state = rebuild_state(trainer, pipe.params, best_lib.check_which(Path(run_dir), which))
    return pipe.evaluate(trainer, state, split, cfg.train.eval_batch_size)
