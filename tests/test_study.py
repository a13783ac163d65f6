"""experiments.study on a tiny grid: cells are run directories, the grid resumes, the report
has mean +- std with n, paired comparisons and plots."""

import csv
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    from experiments import study

    return study


def write_grid(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(
        "model: {name: tiny-roberta}\n"
        "task: {name: rotten_tomatoes, max_len: 16, max_train_examples: 64, "
        "max_eval_examples: 16}\n"
        "train: {batch_size: 8, eval_every: 100, log_every: 3, save_every: 100, "
        "eval_at_start: false}\n"
        "aroma: {max_steps: 8, inner_max_steps: 4, inner_check_every: 2, outer_tol: 1.0e-4, "
        "warmup_steps: 1, rewarmup_steps: 1, learning_rate: 3.0e-3}\n"
    )
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"base: {base}\nseeds: [0, 1]\n"
        "tasks: {rotten_tomatoes: {metric: accuracy, overrides: []}}\n"
        "methods: {aroma: [], lora_r2: [aroma.method=lora, aroma.r=2, aroma.alpha=4.0]}\n"
        "compare: [[aroma, lora_r2]]\n"
    )
    return grid


@pytest.mark.slow
def test_tiny_grid_runs_resumes_and_reports(study, fake_assets, tmp_path, monkeypatch):
    grid = write_grid(tmp_path)
    out = tmp_path / "study"
    assert study.main([str(grid), "--out", str(out)]) == 0
    for method in ("aroma", "lora_r2"):
        for seed in (0, 1):
            summary = json.loads(
                (out / "rotten_tomatoes" / method / f"seed{seed}" / "summary.json").read_text()
            )
            assert summary["status"] == "finished" and summary["steps"] == 8
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4
    assert {r["method"] for r in rows} == {"aroma", "lora_r2"}
    aroma_rows = [r for r in rows if r["method"] == "aroma"]
    assert all(int(r["outer_steps"]) == 2 for r in aroma_rows)
    assert all(int(r["outer_by_cap"]) + int(r["outer_by_eq5"]) == 2 for r in aroma_rows)
    lora = [r for r in rows if r["method"] == "lora_r2"]
    assert all(float(r["avg_trained_params"]) == float(r["adapter_params"]) for r in lora)
    report = (out / "report.md").read_text()
    assert "(n=2)" in report and "| rotten_tomatoes | aroma | lora_r2 | 2 |" in report
    comps = json.loads((out / "comparisons.json").read_text())
    c = comps[0]
    by = {(r["method"], int(r["seed"])): float(r["test"]) for r in rows}
    diff = sum(by[("aroma", s)] - by[("lora_r2", s)] for s in (0, 1)) / 2
    assert abs(c["diff"] - diff) < 1e-9 and c["ci_low"] <= c["diff"] <= c["ci_high"]
    assert (out / "plots" / "rotten_tomatoes.png").stat().st_size > 5000
    # Resumable: a second call runs nothing.
    calls = []
    monkeypatch.setattr(study, "run_cell", lambda *a: calls.append(a))
    assert study.main([str(grid), "--out", str(out)]) == 0
    assert calls == []


def test_paired_statistics_on_known_numbers(study):
    rows = [
        {"task": "t", "method": m, "seed": s, "test": v}
        for m, vals in (("a", [0.8, 0.9, 0.7]), ("b", [0.7, 0.85, 0.6]))
        for s, v in enumerate(vals)
    ]
    c = study.paired(rows, "t", "a", "b")
    # differences 0.1, 0.05, 0.1: mean 0.0833, sd 0.02887, t(2) 97.5% = 4.3027
    assert abs(c["diff"] - 0.083333) < 1e-5
    assert abs((c["ci_high"] - c["diff"]) - 4.302653 * 0.028868 / 3**0.5) < 1e-5
    assert c["wins"] == 3 and c["losses"] == 0 and 0 < c["p_ttest"] < 0.05


def test_unknown_method_is_a_clear_error(study, tmp_path, capsys):
    grid = write_grid(tmp_path)
    with pytest.raises(SystemExit):
        study.main([str(grid), "--out", str(tmp_path / "x"), "--methods", "dora"])
    assert "unknown task/method ['dora']" in capsys.readouterr().err


def test_average_trained_params_counts_each_methods_pair(study):
    shapes = {"m": [8, 4], "n": [2, 3, 5]}  # (in, out) and DenseGeneral (2*3 in, 5 out)
    summary, history = {"steps": 10}, {"outer_steps": []}

    def avg(**meta):
        return study._average_trained(summary, history, {"kernel_shapes": shapes, **meta})

    assert avg(method="lora", r=2) == 2 * (8 + 4) + 2 * (6 + 5)
    assert avg(method="dora", r=2) == 2 * (8 + 4) + 4 + 2 * (6 + 5) + 5
    assert avg(method="adalora", r=1, adalora={"init_r": 3}) == 3 * 12 + 3 + 3 * 11 + 3
    assert avg(method="head", r=1) == 0
    # an AROMA module stopped by eq. 6 at step 4 counts 4 of the 10 steps
    stopped = {"outer_steps": [{"module": "m", "step": 4, "action": "done"}]}
    got = study._average_trained(summary, stopped, {"kernel_shapes": shapes, "r": 1})
    assert got == (12 * 4 + 11 * 10) / 10
