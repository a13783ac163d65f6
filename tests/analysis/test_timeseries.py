"""Time series from a history dict: trained parameters, rank, traces, inner-loop endings."""

import numpy as np
import pytest

from aroma_jax.analysis import timeseries as ts

SIZES = {"m1": (10, 6), "m2": (4, 4), "m3": (8, 2)}  # pairs of r*(in+out): 16, 8, 10 at r=1


def history(with_fields: bool):
    """Steps 1..12; outer steps at 4 (all converged: eq5) and 10 (cap: m2 never converged);
    m1 done at 4, m3 done (merged to capacity) at 10."""
    outer = [
        (4, "m1", "done", 0, "eq5", True),
        (4, "m2", "merged", 1, "eq5", True),
        (4, "m3", "merged", 1, "eq5", True),
        (10, "m2", "merged", 2, "cap", False),
        (10, "m3", "merged_full", 2, "cap", True),
    ]
    recs = []
    for step, m, action, rank, trig, conv in outer:
        r = {"step": step, "module": m, "rho_out": 0.1, "action": action, "rank": rank}
        if with_fields:
            r.update(trigger=trig, inner_converged=conv)
        recs.append(r)
    checks = [
        (2, "m1", float("inf"), False),
        (2, "m2", float("inf"), False),
        (2, "m3", float("inf"), False),
        (4, "m1", 0.01, True),
        (4, "m2", 0.05, True),
        (4, "m3", 0.02, True),
        (6, "m2", float("inf"), False),
        (6, "m3", float("inf"), False),
        (8, "m2", 0.5, False),
        (8, "m3", 0.03, True),  # sticky: m3 stays converged at 10 though its last check is not
        (10, "m2", 0.4, False),
        (10, "m3", 0.3, False),
    ]
    total = {s: (0 if s < 4 else 2 if s < 10 else 4) for s in range(1, 13)}
    return {
        "modules": sorted(SIZES),
        "steps": [{"step": s, "total_rank": total[s]} for s in range(1, 13)],
        "inner_checks": [
            {"step": s, "module": m, "rho_in": v, "converged": c} for s, m, v, c in checks
        ],
        "outer_steps": recs,
    }


def test_trained_params_and_average():
    steps, n = ts.trained_params_series(history(True), SIZES, r=1)
    assert steps.tolist() == list(range(1, 13))
    # m1 (16) trains through step 4, m3 (10) through step 10, m2 (8) to the end
    want = [34] * 4 + [18] * 6 + [8] * 2
    assert n.tolist() == want
    assert ts.average_trained_params(n) == pytest.approx(np.mean(want))
    _, n2 = ts.trained_params_series(history(True), SIZES, r=3)
    assert n2.tolist() == [3 * x for x in want]
    with pytest.raises(ValueError, match="no steps"):
        ts.average_trained_params(np.array([]))


def test_pair_params_per_method():
    assert ts.pair_params(10, 6, 1) == 16 and ts.pair_params(10, 6, 8, "lora") == 128
    assert ts.pair_params(10, 6, 8, "dora") == 128 + 6  # + the magnitude (out)
    # AdaLoRA: init_r triplets (P rows, Q columns, lambda), not cfg.r
    assert ts.pair_params(10, 6, 1, "adalora", init_r=12) == 12 * 16 + 12
    assert ts.pair_params(10, 6, 1, "head") == 0
    h = {"modules": sorted(SIZES), "steps": [{"step": s, "total_rank": 0} for s in range(1, 4)]}
    _, n = ts.trained_params_series(h, SIZES, 1, "adalora", init_r=12)
    assert n.tolist() == [sum(12 * (i + o) + 12 for i, o in SIZES.values())] * 3


def test_lora_is_constant():
    h = {"modules": sorted(SIZES), "steps": [{"step": s, "total_rank": 0} for s in range(1, 6)]}
    _, n = ts.trained_params_series(h, SIZES, r=8)
    assert n.tolist() == [8 * 34] * 5
    _, rank = ts.total_rank_series(h, "lora", 8, 3)
    assert rank.tolist() == [24] * 5
    _, rank = ts.total_rank_series(history(True), "aroma", 1, 3)
    assert rank.tolist() == [0] * 3 + [2] * 6 + [4] * 3
    with pytest.raises(ValueError, match="no per-step records"):
        ts.total_rank_series({"outer_steps": []}, "aroma", 1, 3)


def test_traces_and_rank_series():
    h = history(False)
    inner = ts.inner_traces(h)
    assert inner["m2"][0].tolist() == [2, 4, 6, 8, 10]
    assert inner["m2"][1][1] == 0.05 and np.isinf(inner["m2"][1][0])
    outer = ts.outer_traces(h)
    assert outer["m1"][0].tolist() == [4] and outer["m3"][0].tolist() == [4, 10]
    ranks = ts.module_rank_series(h)
    assert ranks["m2"][1].tolist() == [1, 2] and ranks["m1"][1].tolist() == [0]
    assert ts.done_steps(h) == {"m1": 4, "m3": 10}


@pytest.mark.parametrize("recorded", [True, False])
def test_inner_loop_ends(recorded):
    ends = ts.inner_loop_ends(history(recorded))
    assert [e["step"] for e in ends] == [4, 10]
    assert [e["length"] for e in ends] == [4, 6]
    assert [e["trigger"] for e in ends] == ["eq5", "cap"]
    assert [e["source"] for e in ends] == ["recorded" if recorded else "inferred"] * 2
    assert ends[1]["not_converged"] == ["m2"] and ends[0]["not_converged"] == []
    assert [e["active"] for e in ends] == [3, 2]


def test_inner_loop_ends_without_converged_flags():
    h = history(False)
    for c in h["inner_checks"]:
        del c["converged"]
    ends = ts.inner_loop_ends(h)
    assert [e["source"] for e in ends] == ["unknown"] * 2 and ends[0]["trigger"] is None
    ends = ts.inner_loop_ends(h, inner_tol=0.1)  # from the run's config instead
    assert [e["trigger"] for e in ends] == ["eq5", "cap"]
    ends = ts.inner_loop_ends(h, inner_tol=0.03)  # m2 (0.05) no longer converges at step 4
    assert [e["trigger"] for e in ends] == ["cap", "cap"] and ends[0]["not_converged"] == ["m2"]
