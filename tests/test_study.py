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


def test_long_grid_sweeps_lr_on_validation_then_runs_seeds_and_resumes(
    study, tmp_path, monkeypatch
):
    """The long-budget grid's phases on fake runs (no training): every method at each of its
    rates on seed 0, the best validation rate chosen (a diverged rate is never chosen), seeds 1
    and 2 at that rate only, seed 0's run reused; a restart runs nothing; the report lands
    between the doc's markers, replacing the previous one."""
    grid = tmp_path / "long.yaml"
    grid.write_text(
        "base: base.yaml\nseeds: [0, 1, 2]\n"
        "lr_sweep: {seed: 0, values: [1.0e-3, 2.0e-3, 4.0e-3],\n"
        "           methods: {b: [1.0e-4, 2.0e-4, 4.0e-4]}}\n"
        "tasks: {t: {metric: accuracy, overrides: []}}\n"
        "methods: {a: [], b: [aroma.method=lora]}\n"
        "claims: [[a, b, beats, 'A beats B']]\n"
    )
    best = {"a": 2.0e-3, "b": 4.0e-4}
    calls = []

    def fake_run(base, sets, run):
        lr = float(next(s for s in sets if s.startswith("optimizer.learning_rate=")).split("=")[1])
        seed = int(next(s for s in sets if s.startswith("train.seed=")).split("=")[1])
        method = "b" if "aroma.method=lora" in sets else "a"
        calls.append((method, lr, seed))
        diverged = method == "a" and lr == 4.0e-3  # a NaN validation score is never chosen
        val = float("nan") if diverged else 0.8 - abs(lr - best[method]) / best[method] / 10
        run = Path(run)
        run.mkdir(parents=True)
        test = val + (0.05 if method == "a" else 0.0) + 0.01 * seed
        summary = {
            "status": "finished",
            "metrics": {"accuracy": test},
            # the choice reads final/'s validation score, not the last in-training one (here
            # ordered the other way round, so reading the wrong one picks other rates)
            "validation_metrics": {"accuracy": 1.0 - val},
            "final_validation_metrics": {"accuracy": val},
            "ranks": {"x/0/q": 2, "x/1/q": 3},
            "eq6_stopped": {"modules": 1, "during_training": 1, "at_rank": {"2": 1}},
            "total_rank": 5,
            "outer_steps": 3,
            "steps": 10,
        }
        (run / "summary.json").write_text(json.dumps(summary))
        (run / "history.json").write_text(json.dumps({"outer_steps": []}))
        (run / "metrics.jsonl").write_text(
            "".join(
                json.dumps({"step": s, "split": "validation", "accuracy": val * s / 10}) + "\n"
                for s in (5, 10)
            )
        )
        return "finished"

    monkeypatch.setattr(study, "run_cell", fake_run)
    doc = tmp_path / "REPRODUCTION.md"
    doc.write_text("# Study\n\nkept text\n")
    out = tmp_path / "out"
    assert study.main([str(grid), "--out", str(out), "--doc", str(doc)]) == 0
    sweep = [c for c in calls if c[2] == 0]
    assert sorted(sweep) == sorted(
        [("a", lr, 0) for lr in (1e-3, 2e-3, 4e-3)] + [("b", lr, 0) for lr in (1e-4, 2e-4, 4e-4)]
    )
    assert sorted(c for c in calls if c[2] != 0) == [
        ("a", 2e-3, 1),
        ("a", 2e-3, 2),
        ("b", 4e-4, 1),
        ("b", 4e-4, 2),
    ]
    choice = {r["method"]: r["chosen"] for r in json.loads((out / "lr_choice.json").read_text())}
    assert choice == best
    assert (out / "t" / "a" / "lr0.002" / "seed2" / "summary.json").exists()
    report = (out / "report.md").read_text()
    assert "| t | a | 0.002 | 0.8000 | 2.50 | 2,3 | 1 (1@2) | 3 | **yes** |" in report
    assert "| t | a | 0.004 | - |" in report  # the diverged rate, reported, not chosen
    # A beats B by +0.05 on every seed: the interval excludes 0
    assert "| t | A beats B | a | b | 3 | +0.0500 |" in report and "**holds** (A better)" in report
    assert "a reaches" not in report  # no lora_r8 in this grid: no reach line
    calls.clear()
    assert study.main([str(grid), "--out", str(out), "--doc", str(doc)]) == 0
    assert calls == []  # resumable: everything finished
    text = doc.read_text()
    assert text.startswith("# Study\n\nkept text\n") and text.count(study.BEGIN) == 1
    assert text.count("### Learning-rate sweep") == 1


@pytest.mark.slow
def test_tiny_long_grid_end_to_end(study, fake_assets, tmp_path):
    """The long-budget phases on real tiny runs: the report's rank map, effective-rank ratio and
    score-against-steps sections read the finished run directories."""
    grid = write_grid(tmp_path)
    text = grid.read_text().split("methods:")[0]  # base, seeds [0, 1], tasks
    grid.write_text(
        text + "methods: {aroma: []}\nlr_sweep: {seed: 0, values: [1.0e-3, 3.0e-3, 1.0e-2]}\n"
    )
    base = tmp_path / "base.yaml"  # validation every 4 of the 8 steps: a score-vs-steps curve
    base.write_text(base.read_text().replace("eval_every: 100", "eval_every: 4"))
    out = tmp_path / "long"
    assert study.main([str(grid), "--out", str(out)]) == 0
    choice = json.loads((out / "lr_choice.json").read_text())[0]
    assert choice["complete"] and choice["chosen"] in (1e-3, 3e-3, 1e-2)
    lr = f"lr{choice['chosen']:g}"
    for seed in (0, 1):
        s = json.loads(
            (out / "rotten_tomatoes" / "aroma" / lr / f"seed{seed}" / "summary.json").read_text()
        )
        assert s["status"] == "finished" and "eq6_stopped" in s
    report = (out / "report.md").read_text()
    assert "Rank map, rotten_tomatoes / aroma" in report
    assert "| aroma | 0." in report  # the effective-rank ratio row
    assert "**rotten_tomatoes** (accuracy)" in report and "| aroma | " in report
