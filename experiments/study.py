"""A multi-seed study: a grid of task x method x seed, each cell an ordinary training run.

    python -m experiments.study experiments/study/claims.yaml --out runs/study [--jobs 2]
    python -m experiments.study experiments/study/claims.yaml --out runs/study --report-only

The grid file names a base run config, the tasks (each with its overrides and the metric that
scores it), the methods (overrides on top) and the seeds. Every cell is a run directory
``OUT/<task>/<method>/seed<k>/`` written by `aroma_jax.train.runner.train`, exactly what
``aroma-jax train --config BASE --set ... --output DIR`` writes; ``train.seed`` sets the data
split, the data order and the adapter initialisation, so two methods with the same seed see the
same data in the same order (the comparisons below are paired).

The grid is resumable: a finished cell (``summary.json`` with ``status: finished``) is skipped,
an interrupted one resumes from its checkpoint. A progress bar covers the grid. ``--jobs N``
runs N cells in parallel processes.

The report (``OUT/report.md``, ``OUT/results.csv``, ``OUT/plots/``):

* ``results.csv``: one row per cell: test and validation metrics, ranks, trained and final
  adapter parameters, the average trained parameters over training (the paper's figure 1a),
  outer steps, how the inner loops ended (eq. 5 or the T_in cap), capacity, step time, wall time;
* mean +- std over seeds with n, per task and method;
* paired comparisons (same seeds): the mean difference, its 95% t interval and the paired
  t-test's p-value (``scipy.stats.ttest_rel``), plus the Wilcoxon signed-rank p where n >= 6;
* plots: score against average trained parameters; total rank against step per method.

Settings are chosen on validation only (the grid file says how each was chosen); the test score
of every cell is computed once, at the end of its run, and reported as it is.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import csv
import gzip
import json
import math
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ grid
def load_grid(path: Path) -> dict[str, Any]:
    """Reads and checks a grid file (see ``experiments/study/claims.yaml``)."""
    grid = yaml.safe_load(Path(path).read_text())
    for key in ("base", "tasks", "methods", "seeds"):
        if key not in grid:
            raise SystemExit(
                f"grid {str(path)!r} has no {key!r}: it needs base, tasks, methods, seeds"
            )
    base = Path(grid["base"])
    grid["base"] = base if base.is_absolute() else (ROOT / base)
    grid.setdefault("overrides", [])
    grid.setdefault("compare", [])
    for name, task in grid["tasks"].items():
        if "metric" not in task:
            raise SystemExit(f"task {name!r} in {str(path)!r} names no metric")
        task.setdefault("overrides", [])
    return grid


def cells(grid: Mapping[str, Any], tasks=None, methods=None, seeds=None) -> list[dict]:
    """Every (task, method, seed) cell with its full override list."""
    out = []
    for task, tcfg in grid["tasks"].items():
        if tasks and task not in tasks:
            continue
        for method, overrides in grid["methods"].items():
            if methods and method not in methods:
                continue
            if method in tcfg.get("skip", ()):
                continue
            for seed in seeds or grid["seeds"]:
                sets = [
                    *grid["overrides"],
                    *tcfg["overrides"],
                    *(overrides or ()),
                    f"train.seed={seed}",
                    "train.progress=false",
                ]
                out.append({"task": task, "method": method, "seed": int(seed), "sets": sets})
    return out


def cell_dir(out: Path, cell: Mapping[str, Any]) -> Path:
    if cell.get("lr") is not None:  # a long-budget grid: one directory per learning rate
        return out / cell["task"] / cell["method"] / f"lr{cell['lr']:g}" / f"seed{cell['seed']}"
    return out / cell["task"] / cell["method"] / f"seed{cell['seed']}"


def status(run: Path) -> str:
    try:
        return json.loads((run / "summary.json").read_text()).get("status", "unknown")
    except (OSError, ValueError):
        return "missing" if not run.exists() else "partial"


def run_cell(base: str, sets: Sequence[str], run: str) -> str:
    """Trains one cell (in this process); resumes a partial run directory."""
    from aroma_jax.train import run_config, runner

    run_path = Path(run)
    cfg = run_config.load(base, list(sets))
    resume = run_path.exists() and (run_path / "checkpoints").exists()
    summary = runner.train(cfg, run_path, resume=resume)
    return summary.get("status", "unknown")


def run_grid(
    grid: Mapping[str, Any], todo: list[dict], out: Path, jobs: int, desc: str = "study"
) -> None:
    from tqdm.auto import tqdm

    pending = [c for c in todo if status(cell_dir(out, c)) != "finished"]
    bar = tqdm(total=len(todo), initial=len(todo) - len(pending), desc=desc, unit="run")
    args = [(str(grid["base"]), c["sets"], str(cell_dir(out, c))) for c in pending]
    if jobs <= 1:
        for c, a in zip(pending, args, strict=True):
            bar.set_postfix_str(f"{c['task']}/{c['method']}/seed{c['seed']}")
            run_cell(*a)
            bar.update(1)
    else:
        ctx = __import__("multiprocessing").get_context("spawn")
        with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            running = {pool.submit(run_cell, *a): c for c, a in zip(pending, args, strict=True)}
            for fut in futures.as_completed(running):
                fut.result()
                bar.update(1)
    bar.close()


# --------------------------------------------------------------------------------- results
def _average_trained(summary: Mapping, history: Mapping, meta: Mapping | None) -> float | None:
    """Mean trained adapter parameters per step (figure 1a): a module's pair
    (`timeseries.pair_params`: ``r * (in + out)``, DoRA's magnitude and AdaLoRA's ``init_r``
    triplets included) until the outer step that marks it done."""
    from aroma_jax.analysis import timeseries

    if not meta:
        return None
    method, r = str(meta.get("method", "aroma")), int(meta.get("r", 1))
    init_r = (meta.get("adalora") or {}).get("init_r")
    sizes = {}
    for p, shape in meta.get("kernel_shapes", {}).items():
        fan_in, fan_out = int(np.prod(shape[:-1])), int(shape[-1])
        sizes[p] = timeseries.pair_params(fan_in, fan_out, r, method, init_r)
    steps = int(summary.get("steps", 0))
    if not steps:
        return None
    done_at = timeseries.done_steps(history)
    total = sum(n * min(done_at.get(p, steps), steps) for p, n in sizes.items())
    return total / steps


def collect(out: Path, todo: list[dict], tasks: Mapping[str, Any]) -> list[dict]:
    """One flat row per finished cell."""
    rows = []
    for c in todo:
        run = cell_dir(out, c)
        if status(run) != "finished":
            continue
        s = json.loads((run / "summary.json").read_text())
        hist = read_history(run)
        meta_path = run / "final" / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        metric = tasks[c["task"]]["metric"]
        ranks = list(s.get("ranks", {}).values())
        loops = s.get("inner_loops", {})
        row = {
            "task": c["task"],
            "method": c["method"],
            "seed": c["seed"],
            "metric": metric,
            "test": s["metrics"].get(metric),
            "validation": (final_validation(run) or {}).get(metric),
            "total_rank": s.get("total_rank"),
            "mean_rank": float(np.mean(ranks)) if ranks else None,
            "min_rank": min(ranks) if ranks else None,
            "max_rank": max(ranks) if ranks else None,
            "distinct_ranks": len(set(ranks)),
            # eq. 6's stops during training and at max_steps (summaries written before the
            # final pair was checked count those during training only)
            "modules_stopped_by_eq6": (s.get("eq6_stopped") or {}).get(
                "modules", sum(1 for o in hist.get("outer_steps", []) if o["action"] == "done")
            ),
            "adapter_params": s.get("adapter_params"),
            "avg_trained_params": _average_trained(s, hist, meta),
            "final_adapter_params": s.get("final_adapter_params"),
            "head_params": s.get("head_params"),
            "outer_steps": s.get("outer_steps"),
            "outer_by_eq5": loops.get("outer_by_eq5"),
            "outer_by_cap": loops.get("outer_by_cap"),
            "module_loops_converged": loops.get("module_loops_converged"),
            "module_loops_capped": loops.get("module_loops_capped"),
            "capacity_full": len(s.get("capacity_full", [])),
            "steps": s.get("steps"),
            "step_ms": s.get("step_ms"),
            "wall_s": s.get("wall_s"),
        }
        for k, v in s["metrics"].items():
            row[f"test_{k}"] = v
        rows.append(row)
    return rows


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def paired(rows: list[dict], task: str, a: str, b: str, key: str = "test") -> dict | None:
    """Paired comparison of method ``a`` against ``b`` on the seeds both finished."""
    from scipy import stats

    va = {r["seed"]: r[key] for r in rows if r["task"] == task and r["method"] == a}
    vb = {r["seed"]: r[key] for r in rows if r["task"] == task and r["method"] == b}
    seeds = sorted(set(va) & set(vb))
    if len(seeds) < 2:
        return None
    d = np.array([va[s] - vb[s] for s in seeds], float)
    n = len(d)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if sd > 0 else 0.0
    p = (
        float(stats.ttest_rel([va[s] for s in seeds], [vb[s] for s in seeds]).pvalue)
        if sd > 0
        else (0.0 if mean != 0 else 1.0)
    )
    wil = None
    if n >= 6 and np.any(d != 0):
        wil = float(stats.wilcoxon(d).pvalue)
    return {
        "task": task,
        "a": a,
        "b": b,
        "n": n,
        "diff": mean,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "p_ttest": p,
        "p_wilcoxon": wil,
        "wins": int(np.sum(d > 0)),
        "losses": int(np.sum(d < 0)),
    }


def _fmt(m: float, s: float, n: int, digits: int = 3) -> str:
    if n == 0 or not math.isfinite(m):
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f} (n={n})"


def _fmt_num(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.1f}"
    return f"{x:,}"


def summary_table(rows: list[dict], grid: Mapping[str, Any]) -> list[str]:
    lines = []
    for task, tcfg in grid["tasks"].items():
        trs = [r for r in rows if r["task"] == task]
        if not trs:
            continue
        metric = tcfg["metric"]
        lines += [f"### {task} ({metric}; mean ± std over seeds)", ""]
        lines.append(
            "| method | test | validation | avg trained params | final adapter params | "
            "mean rank (min-max) | outer steps | inner loops ended by eq. 5 / cap | ms/step |"
        )
        lines.append("|---|---|---|---:|---:|---|---:|---:|---:|")
        for method in grid["methods"]:
            mrs = [r for r in trs if r["method"] == method]
            if not mrs:
                continue
            test, val = mean_std([r["test"] for r in mrs]), mean_std([r["validation"] for r in mrs])
            avg = mean_std([r["avg_trained_params"] for r in mrs])
            fin = mean_std([r["final_adapter_params"] for r in mrs])
            rank = mean_std([r["mean_rank"] for r in mrs])
            lo = min(r["min_rank"] for r in mrs if r["min_rank"] is not None)
            hi = max(r["max_rank"] for r in mrs if r["max_rank"] is not None)
            outer = mean_std([r["outer_steps"] for r in mrs])
            eq5 = sum(r["module_loops_converged"] or 0 for r in mrs)
            cap = sum(r["module_loops_capped"] or 0 for r in mrs)
            ms = mean_std([r["step_ms"] for r in mrs])
            lines.append(
                f"| {method} | {_fmt(*test)} | {_fmt(*val)} | {_fmt_num(avg[0])} | "
                f"{_fmt_num(fin[0])} | {rank[0]:.2f} ({lo}-{hi}) | {outer[0]:.1f} | "
                f"{eq5} / {cap} | {ms[0]:.0f} |"
            )
        lines.append("")
    return lines


def comparison_table(comps: list[dict]) -> list[str]:
    lines = [
        "| task | A | B | n | mean(A - B) | 95% CI | paired t p | Wilcoxon p | A wins / losses |",
        "|---|---|---|---:|---:|---|---:|---:|---|",
    ]
    for c in comps:
        wil = "-" if c["p_wilcoxon"] is None else f"{c['p_wilcoxon']:.3f}"
        lines.append(
            f"| {c['task']} | {c['a']} | {c['b']} | {c['n']} | {c['diff']:+.4f} | "
            f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | {c['p_ttest']:.3f} | {wil} | "
            f"{c['wins']} / {c['losses']} |"
        )
    return lines


def plot(rows: list[dict], grid: Mapping[str, Any], out: Path, todo: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, tcfg in grid["tasks"].items():
        trs = [r for r in rows if r["task"] == task]
        if not trs:
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for method in grid["methods"]:
            mrs = [r for r in trs if r["method"] == method and r["avg_trained_params"]]
            if not mrs:
                continue
            x = np.mean([r["avg_trained_params"] for r in mrs])
            m, s, _ = mean_std([r["test"] for r in mrs])
            ax1.errorbar([max(x, 1.0)], [m], yerr=[s], fmt="o", capsize=3, label=method)
            curves = []
            for c in todo:
                if c["task"] != task or c["method"] != method:
                    continue
                steps = read_history(cell_dir(Path(grid["_out"]), c)).get("steps", [])
                if steps:
                    curves.append(([s["step"] for s in steps], [s["total_rank"] for s in steps]))
            if curves:
                n = min(len(c[0]) for c in curves)
                ax2.plot(
                    curves[0][0][:n], np.mean([c[1][:n] for c in curves], axis=0), label=method
                )
        ax1.set_xscale("log")
        ax1.set_xlabel("average trained adapter parameters (figure 1a)")
        ax1.set_ylabel(f"test {tcfg['metric']} (mean ± std)")
        ax1.set_title(f"{task}: score against trained parameters")
        ax1.legend(fontsize=7)
        ax2.set_xlabel("step")
        ax2.set_ylabel("total merged rank (mean over seeds)")
        ax2.set_title(f"{task}: rank growth")
        ax2.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def report(grid: Mapping[str, Any], todo: list[dict], out: Path) -> dict[str, Any]:
    """Writes results.csv, comparisons.json, report.md and the plots; returns what it wrote."""
    rows = collect(out, todo, grid["tasks"])
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with (out / "results.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    comps = []
    for task in grid["tasks"]:
        for a, b in grid["compare"]:
            c = paired(rows, task, a, b)
            if c:
                comps.append(c)
    (out / "comparisons.json").write_text(json.dumps(comps, indent=1))
    grid = {**grid, "_out": str(out)}
    figs = plot(rows, grid, out / "plots", todo)
    lines = [
        "# Study report",
        "",
        f"Grid: `{grid.get('_file', '')}`; {len(rows)} of {len(todo)} runs finished. "
        "Test scores are reported once; settings were not chosen on them.",
        "",
        *summary_table(rows, grid),
        "## Paired comparisons (same seeds, same data order)",
        "",
        *comparison_table(comps),
        "",
        *[f"![{p.stem}](plots/{p.name})" for p in figs],
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    return {"rows": rows, "comparisons": comps, "figures": figs}


# ------------------------------------------------------------------------ long-budget study
# A grid with an ``lr_sweep`` section (experiments/study/long.yaml) runs in two phases: every
# (task, method) at each of its learning rates on the sweep seed, then the remaining seeds at
# the rate with the best validation score of the sweep seed (the sweep seed's run at that rate
# is reused as one of the seeds). Cells live in OUT/<task>/<method>/lr<lr>/seed<k>/; the
# choices are written to OUT/lr_choice.json as soon as a (task, method)'s sweep is complete, so
# a restarted grid runs only what is missing.
BEGIN, END = "<!-- long-budget:begin -->", "<!-- long-budget:end -->"


def lr_values(grid: Mapping[str, Any], method: str) -> list[float]:
    sweep = grid["lr_sweep"]
    values = (sweep.get("methods") or {}).get(method, sweep["values"])
    if len(values) < 3:
        raise SystemExit(f"lr_sweep for {method!r} has {len(values)} values; at least 3 needed")
    return [float(v) for v in values]


def long_cells(
    grid: Mapping[str, Any], tasks=None, methods=None, seeds=None, lrs=None, lr_of=None
) -> list[dict]:
    """Cells at given learning rates: ``lrs`` (every method's sweep values) or ``lr_of``
    ((task, method) -> chosen rate; pairs without a choice are left out)."""
    out = []
    for c in cells(grid, tasks, methods, seeds):
        if lr_of is not None:
            chosen = lr_of.get((c["task"], c["method"]))
            values = [] if chosen is None else [chosen]
        else:
            values = lrs or lr_values(grid, c["method"])
        for lr in values:
            sets = [*c["sets"][:-2], f"optimizer.learning_rate={lr}", *c["sets"][-2:]]
            out.append({**c, "lr": float(lr), "sets": sets})
    return out


def _validation(run: Path, metric: str) -> float | None:
    """The validation score of the run's finalized adapters (`final_validation`); None when
    unfinished or not finite."""
    if status(run) != "finished":
        return None
    v = (final_validation(run) or {}).get(metric)
    return float(v) if v is not None and math.isfinite(float(v)) else None


def choose_lrs(grid: Mapping[str, Any], out: Path, sweep: list[dict]) -> dict:
    """(task, method) -> the sweep seed's best-validation rate, once all its rates finished
    (ties: the smaller rate). Written to OUT/lr_choice.json with every sweep score."""
    by: dict[tuple[str, str], list[dict]] = {}
    for c in sweep:
        by.setdefault((c["task"], c["method"]), []).append(c)
    chosen, record = {}, []
    for (task, method), cs in by.items():
        metric = grid["tasks"][task]["metric"]
        done = all(status(cell_dir(out, c)) == "finished" for c in cs)
        scores = {c["lr"]: _validation(cell_dir(out, c), metric) for c in cs}
        valid = {lr: v for lr, v in scores.items() if v is not None}
        pick = None
        if done and valid:
            best = max(valid.values())
            pick = min(lr for lr, v in valid.items() if v == best)
            chosen[(task, method)] = pick
        record.append(
            {
                "task": task,
                "method": method,
                "metric": metric,
                "complete": done,
                "validation": {f"{lr:g}": v for lr, v in sorted(scores.items())},
                "chosen": pick,
            }
        )
    (out / "lr_choice.json").write_text(json.dumps(record, indent=1))
    return chosen


def read_history(run: Path) -> dict:
    """A cell's ``history.json``, or the ``history.json.gz`` that `archive` keeps ({} if none)."""
    if (run / "history.json").exists():
        return json.loads((run / "history.json").read_text())
    if (run / "history.json.gz").exists():
        return json.loads(gzip.decompress((run / "history.json.gz").read_bytes()))
    return {}


def _curve(run: Path, metric: str) -> dict[int, float]:
    """Validation score by step from the run's metrics log (the score against steps)."""
    out = {}
    path = run / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("split") == "validation" and rec.get(metric) is not None:
            out[int(rec["step"])] = float(rec[metric])
    return out


FINAL_VALIDATION = "final_validation.json"


def final_validation(run: Path) -> dict | None:
    """A finished cell's ``final/`` adapters scored on validation: what a setting is chosen by.

    The last in-training evaluation is steps before the end (step 1,000 of 1,200 at the long
    budget, 150 of 300 at the demo's) and sees the pairs before finalize merges or drops them.
    Runs since the runner scores ``final/`` on validation carry it in summary.json
    (``final_validation_metrics``); for older cells it is computed once with
    ``runner.evaluate_only`` and kept in ``RUN/final_validation.json`` (archived with the cell).
    None where neither exists and ``final/`` is gone (an archive of an older cell).
    """
    summary = json.loads((run / "summary.json").read_text())
    if summary.get("final_validation_metrics") is not None:
        return summary["final_validation_metrics"]
    cache = run / FINAL_VALIDATION
    if cache.exists():
        return json.loads(cache.read_text())
    if not (run / "final").exists():
        return None
    from aroma_jax.train import run_config, runner

    metrics = runner.evaluate_only(run_config.load_run(run), run, "validation")
    cache.write_text(json.dumps(metrics))
    return metrics


def _analysis(run: Path) -> dict | None:
    """Per-module rank, layer, matrix and effective rank of the final update (App. C); from
    the cell's ``analysis.json`` where `archive` left one instead of the adapters."""
    from aroma_jax.analysis import summary as analysis
    from aroma_jax.analysis.runs import open_run

    if (run / "analysis.json").exists():
        return json.loads((run / "analysis.json").read_text())
    if not (run / "final").exists():
        return None
    return analysis.analyze_run(open_run(run))


ARCHIVED = ("summary.json", "config.yaml", "metrics.jsonl", FINAL_VALIDATION)


def archive(out: Path, dest: Path) -> int:
    """Copies every finished cell's record (`ARCHIVED`, its history gzipped) and its analysis
    (``analysis.json`` without the time series, computed from ``final/`` once) from the study
    directory ``out`` into ``dest``: about 130 kB a cell instead of the adapters, enough for
    ``--report-only`` on ``dest`` and for skipping the cell when the grid resumes there.
    Returns the number of cells archived."""
    n = 0
    for summary in sorted(out.rglob("summary.json")):
        run = summary.parent
        if status(run) != "finished":
            continue
        target = dest / run.relative_to(out)
        target.mkdir(parents=True, exist_ok=True)
        final_validation(run)  # computed now for an older cell: the archive has no final/
        for name in ARCHIVED:
            if (run / name).exists():
                shutil.copyfile(run / name, target / name)
        if (run / "history.json").exists():
            history = json.loads((run / "history.json").read_text())
            compact = json.dumps(history, separators=(",", ":")).encode()
            (target / "history.json.gz").write_bytes(gzip.compress(compact, mtime=0))
        if not (target / "analysis.json").exists():
            result = _analysis(run)
            if result is not None:
                result.pop("timeseries", None)  # derivable from the history
                text = json.dumps(result, separators=(",", ":"), default=float)
                (target / "analysis.json").write_text(text)
        n += 1
    return n


def verdict(comp: dict | None, claim: str) -> str:
    """Verdict words from a paired comparison's 95% interval of mean(A - B).

    ``claim`` "matches": A matches or beats B; "beats": A beats B.
    """
    if comp is None:
        return "not measured"
    if comp["ci_low"] > 0:
        return "**holds** (A better)"
    if comp["ci_high"] < 0:
        return "**does not hold** (B better)"
    return "holds (level within noise)" if claim == "matches" else "not shown (level within noise)"


def _mean_pm(xs: Sequence[float | None], digits: int = 3) -> str:
    return _fmt(*mean_std([x for x in xs if x is not None]), digits=digits)


def long_report(grid: Mapping[str, Any], out: Path, chosen: dict, final: list[dict]) -> str:
    """The long-budget section of docs/REPRODUCTION.md, from the finished cells."""
    rows = collect(out, final, grid["tasks"])
    key = lambda r: (r["task"], r["method"])  # noqa: E731
    lines = [
        "## The claims at a budget where rank can adapt",
        "",
        f"Grid `{grid.get('_file', '')}`: {len(rows)} of {len(final)} final runs finished "
        f"(seeds {list(grid['seeds'])} at each method's chosen learning rate). Learning rates "
        "were chosen on the sweep seed's validation split; test scores are reported once.",
        "",
        "### Learning-rate sweep (seed "
        f"{grid['lr_sweep'].get('seed', 0)}, validation; ranks and modules eq. 6 stopped)",
        "",
        "| task | method | lr | validation | mean rank | distinct ranks | modules stopped by "
        "eq. 6 (count@rank) | outer steps | chosen |",
        "|---|---|---:|---:|---:|---|---|---:|---|",
    ]
    sweep_rows = []
    for rec in json.loads((out / "lr_choice.json").read_text()):
        for lr_text, v in rec["validation"].items():
            lr = float(lr_text)
            cell = {
                "task": rec["task"],
                "method": rec["method"],
                "lr": lr,
                "seed": grid["lr_sweep"].get("seed", 0),
            }
            run = cell_dir(out, cell)
            s = json.loads((run / "summary.json").read_text()) if status(run) == "finished" else {}
            ranks = list((s.get("ranks") or {}).values())
            stop = s.get("eq6_stopped") or {}
            at = ", ".join(f"{n}@{r}" for r, n in (stop.get("at_rank") or {}).items())
            sweep_rows.append((rec, lr, s))
            lines.append(
                f"| {rec['task']} | {rec['method']} | {lr:g} | "
                f"{'-' if v is None else f'{v:.4f}'} | "
                f"{f'{np.mean(ranks):.2f}' if ranks else '-'} | "
                f"{','.join(map(str, sorted(set(ranks)))) or '-'} | "
                f"{stop.get('modules', '-')}{f' ({at})' if at else ''} | "
                f"{s.get('outer_steps', '-')} | {'**yes**' if rec['chosen'] == lr else ''} |"
            )
    lines += ["", "### Score against trained and final parameters (mean ± std over seeds)", ""]
    lines.append(
        "| task | method | lr | test | validation | avg trained params | final adapter params | "
        "mean rank (min-max) | distinct ranks | modules stopped by eq. 6 | outer steps |"
    )
    lines.append("|---|---|---:|---|---|---:|---:|---|---|---:|---:|")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    for (task, method), rs in groups.items():
        lo = min(r["min_rank"] for r in rs if r["min_rank"] is not None)
        hi = max(r["max_rank"] for r in rs if r["max_rank"] is not None)
        distinct = sorted(
            {
                v
                for c in final
                if (c["task"], c["method"]) == (task, method)
                for v in _summary(out, c).get("ranks", {}).values()
            }
        )
        stopped = mean_std([r["modules_stopped_by_eq6"] for r in rs])
        lines.append(
            f"| {task} | {method} | {chosen.get((task, method), float('nan')):g} | "
            f"{_mean_pm([r['test'] for r in rs])} | {_mean_pm([r['validation'] for r in rs])} | "
            f"{_fmt_num(mean_std([r['avg_trained_params'] for r in rs])[0])} | "
            f"{_fmt_num(mean_std([r['final_adapter_params'] for r in rs])[0])} | "
            f"{mean_std([r['mean_rank'] for r in rs])[0]:.2f} ({lo}-{hi}) | "
            f"{','.join(map(str, distinct))} | {stopped[0]:.1f} | "
            f"{mean_std([r['outer_steps'] for r in rs])[0]:.1f} |"
        )
    comps = []
    for task in grid["tasks"]:
        for a, b, claim, text in grid.get("claims", []):
            c = paired(rows, task, a, b)
            comps.append((task, a, b, claim, text, c))
    lines += [
        "",
        "### The claims (paired over seeds; 95% t interval of mean(A - B))",
        "",
        "Verdicts: the interval above 0 **holds** (A better); below 0 **does not hold**; "
        "containing 0: for 'matches or beats' claims *holds (level within noise)*, for 'beats' "
        "claims *not shown (level within noise)*.",
        "",
        "| task | paper's claim | A | B | n | mean(A - B) | 95% CI | p | A wins / losses | "
        "verdict |",
        "|---|---|---|---|---:|---:|---|---:|---|---|",
    ]
    for task, a, b, claim, text, c in comps:
        if c is None:
            lines.append(f"| {task} | {text} | {a} | {b} | - | - | - | - | - | not measured |")
            continue
        lines.append(
            f"| {task} | {text} | {a} | {b} | {c['n']} | {c['diff']:+.4f} | "
            f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | {c['p_ttest']:.3f} | "
            f"{c['wins']} / {c['losses']} | {verdict(c, claim)} |"
        )
    lines += rank_section(grid, out, final, chosen)
    lines += steps_section(grid, out, final)
    return "\n".join(lines) + "\n"


def _summary(out: Path, cell: Mapping[str, Any]) -> dict:
    run = cell_dir(out, cell)
    return json.loads((run / "summary.json").read_text()) if status(run) == "finished" else {}


def rank_section(grid: Mapping[str, Any], out: Path, final: list[dict], chosen: dict) -> list:
    """Rank maps per layer and matrix (Fig. 3, mean over seeds), effective-rank ratios
    (App. C), and the modules eq. 6 stopped, at which rank."""
    lines = ["", "### Where the rank went (paper Fig. 3, App. C)", ""]
    methods = [m for m in grid["methods"] if any(c["method"] == m for c in final)]
    for task in grid["tasks"]:
        lines.append(
            f"**{task}**: effective-rank ratio (sum of effective ranks over sum of ranks, mean "
            "over seeds) and modules eq. 6 stopped (count@rank, summed over seeds)"
        )
        lines += [
            "",
            "| method | erank/rank | mean module erank/rank | eq. 6 stopped |",
            "|---|---:|---:|---|",
        ]
        maps = {}
        for method in methods:
            cs = [c for c in final if c["task"] == task and c["method"] == method]
            ratios, means, at, per = [], [], {}, {}
            for c in cs:
                a = _analysis(cell_dir(out, c)) if status(cell_dir(out, c)) == "finished" else None
                if a is None:
                    continue
                ratios.append(a["totals"]["effective_rank_ratio"])
                means.append(a["totals"]["mean_effective_rank_ratio"])
                for m in a["modules"].values():
                    per.setdefault((m["layer"], m["matrix"]), []).append(m["rank"])
                for r, n in (
                    (_summary(out, c).get("eq6_stopped") or {}).get("at_rank") or {}
                ).items():
                    at[int(r)] = at.get(int(r), 0) + n
            if not ratios:
                continue
            maps[method] = per
            lines.append(
                f"| {method} | {_mean_pm(ratios)} | {_mean_pm(means)} | "
                f"{sum(at.values())} ({', '.join(f'{n}@{r}' for r, n in sorted(at.items()))}) |"
            )
        for method, per in maps.items():
            layers = sorted({k[0] for k in per}, key=lambda x: (x is None, x))
            matrices = sorted({k[1] for k in per})
            lines += [
                "",
                f"Rank map, {task} / {method} (mean over seeds; rows: layer):",
                "",
                "| layer | " + " | ".join(matrices) + " |",
                "|---|" + "---:|" * len(matrices),
            ]
            for layer in layers:
                cells_ = [per.get((layer, m)) for m in matrices]
                lines.append(
                    f"| {layer} | "
                    + " | ".join("-" if v is None else f"{np.mean(v):.1f}" for v in cells_)
                    + " |"
                )
        lines.append("")
    return lines


def steps_section(grid: Mapping[str, Any], out: Path, final: list[dict]) -> list:
    """Validation score against steps, mean over seeds: does AROMA reach LoRA's score sooner,
    later or never?"""
    lines = ["### Score against steps (validation, mean over seeds)", ""]
    for task, tcfg in grid["tasks"].items():
        curves = {}
        for method in grid["methods"]:
            cs = [c for c in final if c["task"] == task and c["method"] == method]
            per = [_curve(cell_dir(out, c), tcfg["metric"]) for c in cs]
            per = [p for p in per if p]
            if per:
                steps = sorted(set.intersection(*(set(p) for p in per)))
                curves[method] = {s: float(np.mean([p[s] for p in per])) for s in steps}
        if not curves:
            continue
        steps = sorted({s for c in curves.values() for s in c})
        lines += [
            f"**{task}** ({tcfg['metric']})",
            "",
            "| method | " + " | ".join(str(s) for s in steps) + " |",
            "|---|" + "---:|" * len(steps),
        ]
        for method, c in curves.items():
            lines.append(
                f"| {method} | "
                + " | ".join(f"{c[s]:.4f}" if s in c else "-" for s in steps)
                + " |"
            )
        ref, cand = grid.get("reach", ["lora_r8", "aroma"])
        if ref in curves and cand in curves and curves[ref]:
            target = curves[ref][max(curves[ref])]
            hit = [s for s in sorted(curves[cand]) if curves[cand][s] >= target]
            first_ref = min(s for s in curves[ref] if curves[ref][s] >= target)
            when = (
                "never"
                if not hit
                else (
                    "sooner"
                    if hit[0] < first_ref
                    else "later"
                    if hit[0] > first_ref
                    else "at the same step"
                )
            )
            lines += [
                "",
                f"{cand} reaches {ref}'s last validation score ({target:.4f}, first "
                f"reached by {ref} at step {first_ref}): **{when}**"
                + (f" (step {hit[0]})" if hit else "")
                + ".",
            ]
        lines.append("")
    return lines


def write_doc(doc: Path, text: str) -> None:
    """Replaces the section between `BEGIN` and `END` in ``doc`` (appends both if missing)."""
    old = doc.read_text() if doc.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + BEGIN + "\n" + text + END + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + BEGIN + "\n" + text + END + "\n"
    doc.write_text(new)


def long_main(grid: dict, args: argparse.Namespace, tasks, methods, seeds) -> int:
    """Both phases of a long-budget grid (see the section comment), then its report."""
    seeds = seeds or grid["seeds"]
    sweep_seed = int(grid["lr_sweep"].get("seed", 0))
    if sweep_seed not in seeds:
        raise SystemExit(f"the sweep seed {sweep_seed} must be one of the seeds {seeds}")
    sweep = long_cells(grid, tasks, methods, [sweep_seed])
    if not args.report_only:
        run_grid(grid, sweep, args.out, args.jobs, desc="lr sweep")
    chosen = choose_lrs(grid, args.out, sweep)
    final = long_cells(grid, tasks, methods, seeds, lr_of=chosen)
    if not args.report_only:
        run_grid(grid, final, args.out, args.jobs, desc="seeds")
    text = long_report(grid, args.out, chosen, final)
    (args.out / "report.md").write_text(text)
    if args.doc:
        write_doc(args.doc, text)
    print(text)
    return 0 if chosen else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Run a task x method x seed grid of training runs (resumable) and report "
        "mean ± std, paired comparisons and plots.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument(
        "grid", type=Path, help="grid YAML (base config, tasks, methods, seeds, compare)"
    )
    p.add_argument("--out", type=Path, required=True, help="study directory (created)")
    p.add_argument(
        "--jobs", type=int, default=1, help="cells run in parallel processes (default 1)"
    )
    p.add_argument("--tasks", help="comma-separated subset of the grid's tasks")
    p.add_argument("--methods", help="comma-separated subset of the grid's methods")
    p.add_argument("--seeds", help="comma-separated seeds instead of the grid's")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report")
    p.add_argument(
        "--archive",
        type=Path,
        help="copy each finished cell's summary, config, metrics, history and analysis (no "
        "adapters) from --out into this directory, then exit (e.g. docs/study/long)",
    )
    p.add_argument(
        "--doc",
        type=Path,
        help="long-budget grids: also write the report into this markdown file, between "
        "its '<!-- long-budget:begin -->' and '<!-- long-budget:end -->' lines",
    )
    args = p.parse_args(argv)
    grid = load_grid(args.grid)
    grid["_file"] = str(args.grid)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    unknown = [t for t in split(args.tasks) or [] if t not in grid["tasks"]]
    unknown += [m for m in split(args.methods) or [] if m not in grid["methods"]]
    if unknown:
        p.error(
            f"unknown task/method {unknown}: the grid has tasks {list(grid['tasks'])} and "
            f"methods {list(grid['methods'])}"
        )
    seeds = [int(s) for s in split(args.seeds)] if args.seeds else None
    if args.archive:
        print(f"archived {archive(args.out, args.archive)} finished cells into {args.archive}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if "lr_sweep" in grid:  # the long-budget study: learning rates chosen on validation first
        return long_main(grid, args, split(args.tasks), split(args.methods), seeds)
    todo = cells(grid, split(args.tasks), split(args.methods), seeds)
    if not args.report_only:
        run_grid(grid, todo, args.out, args.jobs)
    res = report(grid, todo, args.out)
    print((args.out / "report.md").read_text())
    return 0 if res["rows"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
