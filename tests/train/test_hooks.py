"""The training loop's hooks (`aroma_jax.train.hooks`): schedule, order, stop, resume."""

import pytest

from aroma_jax.train.hooks import Hook, TrainLoop


class CountingTrainer:
    """A stand-in trainer: the state is the list of batches seen; the info is the step."""

    def step(self, state, batch):
        return state + [batch], len(state) + 1


def loop_calls(start, total, *hooks):
    calls = []
    loop = TrainLoop(CountingTrainer(), [], lambda s: s * 10, start, total)
    for name, every, last in hooks:
        loop.add_hook(lambda lp, n=name: calls.append((n, lp.step)), every, last, name)
    return loop, calls


def test_hooks_run_on_their_schedule_in_order():
    loop, calls = loop_calls(0, 10, ("a", 1, False), ("b", 4, True), ("c", 5, False))
    assert loop.run() is None and loop.step == 10
    assert [s for n, s in calls if n == "b"] == [4, 8, 10]  # and the last step
    assert [s for n, s in calls if n == "c"] == [5, 10]
    assert calls[:5] == [("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 4)]
    assert loop.state == [s * 10 for s in range(10)] and loop.info == 10


def test_a_resumed_loop_calls_hooks_at_the_same_steps():
    hooks = (("b", 4, True), ("c", 5, False))
    whole_loop, whole = loop_calls(0, 12, *hooks)
    whole_loop.run()
    first, head = loop_calls(0, 12, *hooks)
    first.add_hook(lambda lp: lp.stop("interrupted") if lp.step == 7 else None)
    assert first.run() == "interrupted" and first.step == 7
    second, tail = loop_calls(7, 12, *hooks)  # resumed at step 7
    second.run()
    assert head + tail == whole and [s for _, s in whole] == [4, 5, 8, 10, 12]


def test_stop_skips_the_rest_of_the_step_and_ends_the_loop():
    loop, calls = loop_calls(0, 10, ("a", 1, False))
    loop.add_hook(lambda lp: lp.stop("done") if lp.step == 3 else None)
    loop.add_hook(lambda lp: calls.append(("after", lp.step)))
    assert loop.run() == "done" and loop.step == 3
    assert ("after", 3) not in calls and ("after", 2) in calls


def test_outer_hooks_and_bad_schedules():
    loop = TrainLoop(CountingTrainer(), [], lambda s: s, 0, 1)
    seen = []
    loop.add_outer_hook(lambda lp, infos: seen.append(list(infos)))
    loop.outer_event(["i1", "i2"])
    assert seen == [["i1", "i2"]]
    for every in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="accepted an integer >= 1"):
            loop.add_hook(Hook(print, every))
