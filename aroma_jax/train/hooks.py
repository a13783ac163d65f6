"""The training loop and its hooks: what runs between steps, each on its own schedule.

`TrainLoop` steps a trainer and, after every step, calls its hooks in the order they were added,
each when due: every ``every`` steps, counted from step 0 of the run (so a resumed run calls them
at the same steps as an uninterrupted one), and at the last step when ``at_last_step``. A hook
gets the loop: ``loop.step`` (steps taken), ``loop.state``, ``loop.info`` (this step's
`StepInfo`, still on the device: reading it waits for the step), ``loop.trainer``; it may call
``loop.stop(reason)``. Window hooks (`TrainLoop.add_window_hook`) get the loop and the host
`StepInfo`s of every synced window (each step's info exactly once, in step order: eq. 5 ratios
where ``info.checked``, eq. 6 where ``info.outer``), outer-step hooks
(`TrainLoop.add_outer_hook`) only the windows that hold an outer step.

The runner (`aroma_jax.train.runner.train`) builds its metrics/TensorBoard, checkpoint, eval,
progress bar, NaN stop, interrupt and finish hooks on this, and takes a user's:

    from aroma_jax.train import hooks, runner

    def log_eq6(loop, infos):
        for info in infos:
            if info.outer:
                print(int(info.step), dict(zip(loop.trainer.paths, info.rho_out.tolist())))

    runner.train(cfg, "runs/x", hooks=[hooks.Hook(lambda loop: print(loop.step), every=50)],
                 outer_hooks=[log_eq6])

(levanter's ``Trainer.add_hook(fn, every=N)`` is the model.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple


class Hook(NamedTuple):
    """``fn(loop)`` after every ``every``-th step (and after the last one if ``at_last_step``)."""

    fn: Callable[[TrainLoop], Any]
    every: int = 1
    at_last_step: bool = False
    name: str = ""


OuterHook = Callable[["TrainLoop", Sequence[Any]], Any]


class TrainLoop:
    """Steps ``trainer`` from ``start`` to ``total`` steps on ``batch_at(step)``, calling hooks.

    Args:
      trainer: an `AromaTrainer` (anything with ``step(state, batch) -> (state, info)``).
      state: the state to start from.
      batch_at: the batch of a step (a pure function of it, so a resumed run sees the same data).
      start: steps already taken.
      total: the step to stop at.
      step_fn: ``(state, batch) -> (state, info)`` instead of ``trainer.step`` (the runner's
        adds the profiler window and, on multi-process CPU runs, a barrier before each step).
    """

    def __init__(
        self,
        trainer: Any,
        state: Any,
        batch_at: Callable[[int], Any],
        start: int,
        total: int,
        step_fn: Callable[[Any, Any], tuple[Any, Any]] | None = None,
    ):
        self.trainer, self.state, self.batch_at = trainer, state, batch_at
        self.step_fn = trainer.step if step_fn is None else step_fn
        self.step, self.total = start, total
        self.info: Any = None
        self.stopped: str | None = None
        self.hooks: list[Hook] = []
        self.outer_hooks: list[OuterHook] = []
        self.window_hooks: list[OuterHook] = []

    def add_hook(
        self,
        fn: Callable[[TrainLoop], Any] | Hook,
        every: int = 1,
        at_last_step: bool = False,
        name: str = "",
    ) -> Hook:
        """Adds a hook after those already added (``fn`` may be a ready `Hook`)."""
        hook = fn if isinstance(fn, Hook) else Hook(fn, every, at_last_step, name)
        if isinstance(hook.every, bool) or not isinstance(hook.every, int) or hook.every < 1:
            raise ValueError(
                f"hook {hook.name or hook.fn!r}: every={hook.every!r}; accepted an integer >= 1"
            )
        self.hooks.append(hook)
        return hook

    def add_outer_hook(self, fn: OuterHook) -> None:
        """``fn(loop, infos)`` for every synced window of host `StepInfo`s with an outer step."""
        self.outer_hooks.append(fn)

    def add_window_hook(self, fn: OuterHook) -> None:
        """``fn(loop, infos)`` for every synced window of host `StepInfo`s."""
        self.window_hooks.append(fn)

    def window_event(self, infos: Sequence[Any]) -> None:
        """Calls the window hooks (the runner calls this for every synced window)."""
        for fn in self.window_hooks:
            fn(self, infos)

    def outer_event(self, infos: Sequence[Any]) -> None:
        """Calls the outer-step hooks (the runner calls this when a window held an outer step)."""
        for fn in self.outer_hooks:
            fn(self, infos)

    def stop(self, reason: str) -> None:
        """Ends the run after the current hook (the remaining hooks of this step are skipped)."""
        self.stopped = reason

    def due(self, hook: Hook) -> bool:
        return self.step % hook.every == 0 or (hook.at_last_step and self.step == self.total)

    def run(self) -> str | None:
        """Steps until ``total`` or a hook stops the loop; returns the reason (``None``: total)."""
        while self.step < self.total and self.stopped is None:
            self.state, self.info = self.step_fn(self.state, self.batch_at(self.step))
            self.step += 1
            for hook in self.hooks:
                if self.due(hook):
                    hook.fn(self)
                    if self.stopped is not None:
                        break
        return self.stopped
