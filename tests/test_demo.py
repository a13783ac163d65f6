"""The demo's side-by-side table from two run summaries (no training)."""

import re

from aroma_jax import demo


def summary(method, ranks, outer, loops, acc):
    return {
        "method": method,
        "metrics": {"accuracy": acc},
        "adapter_params": 41472,
        "final_adapter_params": 158208,
        "head_params": 770,
        "total_rank": sum(ranks.values()),
        "outer_steps": outer,
        "inner_loops": loops,
        "ranks": ranks,
        "step_ms": 250.0,
        "steps": 300,
        "wall_s": 100.0,
        "compiles": 1,
    }


def test_table_shows_how_inner_loops_ended_and_the_distinct_ranks():
    aroma = summary(
        "aroma",
        {"a/0/q": 4, "a/0/v": 2},
        3,
        {"module_loops_converged": 6, "module_loops_capped": 0},
        0.792,
    )
    aroma["eq6_stopped"] = {"modules": 1, "during_training": 1, "at_rank": {"2": 1}}
    aroma["final_pairs"] = {"merged": 0, "dropped": 1, "zero": 0}
    lora = summary("lora", {"a/0/q": 8, "a/0/v": 8}, 0, {}, 0.79)
    lines = demo.table({"aroma": aroma, "lora-r8": lora}).splitlines()
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines[1:]]
    row = {c[0]: c[1:] for c in cells}
    assert row["held-out accuracy"] == ["0.7920", "0.7900"]
    assert row["inner loops ended by eq.5 / cap"] == ["6 / 0", "-"]
    assert row["ranks (distinct values)"] == ["2,4", "8"]
    assert row["ms / step (no compile, eval)"] == ["250", "250"]
    assert row["modules eq.6 stopped / all"] == ["1/2 (1@2)", "-"]
    assert row["pairs left at T: merged / dropped"] == ["0 / 1", "-"]
