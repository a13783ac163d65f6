"""The numbers of a report, as plain dicts: per-run spectra and time series, cross-run subspace
similarity, and the Appendix E cosine matrices. Factors are read one module at a time.

Example:
    >>> from aroma_jax.analysis.runs import open_run  # doctest: +SKIP
    >>> a, b = open_run("runs/x/aroma"), open_run("runs/x/lora")  # doctest: +SKIP
    >>> analyze_run(a)["totals"]["effective_rank_ratio"]  # doctest: +SKIP
    0.97
    >>> compare_runs(a, b)["modules"][a.paths[0]]["similarity"]  # doctest: +SKIP
    0.12
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from aroma_jax.analysis import spectra, timeseries
from aroma_jax.analysis.runs import ModuleFactors, Run, locate


def module_report(m: ModuleFactors, svd: spectra.UpdateSVD | None = None) -> dict:
    """Location and spectrum numbers of one module's update (``svd``: its `update_svd`, when
    the caller already has it)."""
    fan_in, fan_out, k = m.a.shape[0], m.b.shape[1], m.a.shape[1]
    loc = locate(m.path)
    sigma = (svd or spectra.update_svd(m.a, m.b, m.scale)).s
    return {
        "layer": loc.layer,
        "stack": loc.stack,
        "matrix": loc.matrix,
        "label": loc.label,
        "fan_in": fan_in,
        "fan_out": fan_out,
        **spectra.spectrum_stats(sigma, k, (fan_in, fan_out)),
    }


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def totals(modules: dict[str, dict]) -> dict:
    """Whole-model numbers: sums, and means over modules (the paper's "Avg r" / "Eff r").

    ``effective_rank_ratio`` is sum(erank) / sum(rank); ``mean_effective_rank_ratio`` averages
    the per-module ratios over modules of nonzero rank.
    """
    ranks = [m["rank"] for m in modules.values()]
    eranks = [m["effective_rank"] for m in modules.values()]
    ratios = [m["effective_rank_ratio"] for m in modules.values() if m["rank"] > 0]
    total = sum(ranks)
    return {
        "modules": len(modules),
        "total_rank": int(total),
        "total_effective_rank": float(sum(eranks)),
        "effective_rank_ratio": float(sum(eranks) / total) if total else None,
        "mean_effective_rank_ratio": _mean(ratios),
        "mean_rank": _mean(ranks),
        "mean_effective_rank": _mean(eranks),
        "mean_stable_rank": _mean([m["stable_rank"] for m in modules.values()]),
        "zero_rank_modules": sum(1 for r in ranks if r == 0),
    }


def run_timeseries(run: Run) -> dict | None:
    """Figure 1 curves, eq. 5/6 traces and inner-loop ends; None without a per-step history."""
    h = run.history
    if not h or not h.get("steps"):
        return None
    sizes = {p: (s[0], s[1]) for p, s in run.shapes.items()}
    steps, trained = timeseries.trained_params_series(h, sizes, run.r, run.method, run.init_r)
    _, rank = timeseries.total_rank_series(h, run.method, run.r, len(run.shapes))
    ends = timeseries.inner_loop_ends(h, run.inner_tol)
    pairs = lambda d: {m: {"steps": s.tolist(), "values": v.tolist()} for m, (s, v) in d.items()}
    return {
        "steps": steps.tolist(),
        "total_rank": rank.tolist(),
        "trained_params": trained.tolist(),
        "average_trained_params": timeseries.average_trained_params(trained),
        "initial_trained_params": int(trained[0]),
        "done_at": timeseries.done_steps(h),
        "module_ranks": pairs(timeseries.module_rank_series(h)),
        "eq5": pairs(timeseries.inner_traces(h)),
        "eq6": pairs(timeseries.outer_traces(h)),
        "inner_loop_ends": ends,
        "triggers": {
            name: sum(1 for e in ends if e["trigger"] == t)
            for name, t in (("eq5", "eq5"), ("cap", "cap"), ("unknown", None))
        },
    }


def run_info(run: Run, modules: dict[str, dict]) -> dict:
    """A run's metadata, its per-module reports, totals and time series, as one dict."""
    s = run.summary
    return {
        "name": run.name,
        "source": run.source,
        "method": run.method,
        "r": run.r,
        "scale": run.scale,
        "model": s.get("model"),
        "task": s.get("task"),
        "steps": s.get("steps"),
        "stopped": s.get("stopped"),
        "metrics": s.get("metrics", {}),
        "head_params": s.get("head_params"),
        "modules": modules,
        "totals": totals(modules),
        "timeseries": run_timeseries(run),
    }


def analyze_run(run: Run) -> dict:
    """Every per-run number: metadata, per-module spectra, totals and time series."""
    return run_info(run, {m.path: module_report(m) for m in run.iter_factors()})


def _basis(svd: spectra.UpdateSVD, shape: tuple[int, int], side: str) -> np.ndarray:
    """The top singular directions of an update, as many as its numerical rank."""
    n = spectra.numerical_rank(svd.s, shape)
    return svd.u[:, :n] if side == "input" else svd.vt[:n].T


def compare_svds(
    s1: spectra.UpdateSVD, s2: spectra.UpdateSVD, ranks: tuple[int, int], grid: bool = False
) -> dict:
    """Subspace similarity of two updates of one module (LoRA paper, section 7).

    Over the top ``k = min(k1, k2)`` directions (each capped at its numerical rank):
    ``similarity`` is ``phi(k, k)`` on the input side, ``similarity_output`` on the output side,
    ``similarity_top1`` is ``phi(1, 1)``, and ``angles_deg`` the principal angles between the
    input-side subspaces. ``grid`` adds the whole input-side ``phi(i, j)`` table.
    """
    shape = (s1.u.shape[0], s1.vt.shape[1])
    if shape != (s2.u.shape[0], s2.vt.shape[1]):
        raise ValueError(
            f"updates of different shapes: {shape} and {s2.u.shape[0], s2.vt.shape[1]}"
        )
    u1, u2 = _basis(s1, shape, "input"), _basis(s2, shape, "input")
    v1, v2 = _basis(s1, shape, "output"), _basis(s2, shape, "output")
    k = min(u1.shape[1], u2.shape[1])
    out: dict[str, Any] = {"k": k, "ranks": list(ranks)}
    if k == 0:
        out.update(similarity=None, similarity_output=None, similarity_top1=None, angles_deg=[])
    else:
        out.update(
            similarity=spectra.subspace_similarity(u1, u2, k, k),
            similarity_output=spectra.subspace_similarity(v1, v2, k, k),
            similarity_top1=spectra.subspace_similarity(u1, u2, 1, 1),
            angles_deg=np.degrees(spectra.principal_angles(u1[:, :k], u2[:, :k])).tolist(),
        )
    if grid:
        out["grid"] = spectra.subspace_similarity_grid(u1, u2).tolist()
    return out


def compare_modules(m1: ModuleFactors, m2: ModuleFactors, grid: bool = False) -> dict:
    """`compare_svds` of two runs' factors of the same module."""
    if (m1.a.shape[0], m1.b.shape[1]) != (m2.a.shape[0], m2.b.shape[1]):
        raise ValueError(f"module {m1.path!r} has different shapes in the two runs")
    s1 = spectra.update_svd(m1.a, m1.b, m1.scale)
    s2 = spectra.update_svd(m2.a, m2.b, m2.scale)
    return compare_svds(s1, s2, (m1.a.shape[1], m2.a.shape[1]), grid)


def common_paths(runs: Sequence[Run]) -> list[str]:
    paths = set(runs[0].paths)
    for r in runs[1:]:
        paths &= set(r.paths)
    return sorted(paths)


def _comparison(names: Sequence[str], modules: dict[str, dict]) -> dict:
    sims = [m["similarity"] for m in modules.values() if m["similarity"] is not None]
    return {"runs": list(names), "modules": modules, "mean_similarity": _mean(sims)}


def compare_runs(a: Run, b: Run, grid_module: str | None = None) -> dict:
    """`compare_modules` for every module the two runs share (two modules in memory at a time)."""
    modules = {
        p: compare_modules(a.factors(p), b.factors(p), grid=p == grid_module)
        for p in common_paths([a, b])
    }
    return _comparison([a.name, b.name], modules)


def analyze_runs(runs: Sequence[Run], grid_module: str | None = None) -> tuple[list, list]:
    """`analyze_run` of every run and `compare_runs` of every pair ``i < j`` in one pass.

    Module by module: each run's factors of that module are loaded and decomposed once, used
    for its report and for every pair, then dropped, so memory holds one module per run.
    """
    modules: list[dict[str, dict]] = [{} for _ in runs]
    pairs = [(i, j) for i in range(len(runs)) for j in range(i + 1, len(runs))]
    compared: list[dict[str, dict]] = [{} for _ in pairs]
    for p in sorted(set().union(*(r.paths for r in runs))):
        here = [i for i, r in enumerate(runs) if p in r.shapes]
        facs = {i: runs[i].factors(p) for i in here}
        svds = {i: spectra.update_svd(f.a, f.b, f.scale) for i, f in facs.items()}
        for i in here:
            modules[i][p] = module_report(facs[i], svds[i])
        for n, (i, j) in enumerate(pairs):
            if i in svds and j in svds:
                ranks = (facs[i].a.shape[1], facs[j].a.shape[1])
                compared[n][p] = compare_svds(svds[i], svds[j], ranks, grid=p == grid_module)
    reports = [run_info(r, m) for r, m in zip(runs, modules, strict=True)]
    comparisons = [
        _comparison([runs[i].name, runs[j].name], c)
        for (i, j), c in zip(pairs, compared, strict=True)
    ]
    return reports, comparisons


def pick_module(runs: Sequence[Run]) -> str:
    """The default module for per-module figures: shared by every run, with the most components
    in the run where it has fewest (ties: more components in the first run, then path order)."""
    paths = common_paths(runs)
    if not paths:
        raise ValueError("the runs share no adapted module: " + ", ".join(r.name for r in runs))
    key = lambda p: (min(r.ranks[p] for r in runs), runs[0].ranks[p])
    best = max(map(key, paths))
    return next(p for p in paths if key(p) == best)


def cosine_study(runs: Sequence[Run], module: str) -> dict:
    """Appendix E: cosine matrices between the rank-one components of ``module``.

    ``self[name]`` compares a run's components with each other (rows and columns in merge order);
    ``pairs`` compares run ``i`` (rows) with run ``j`` (columns) for every ``i < j``, as the
    paper's with/without-Reset figure does, with its ``diagonal`` (component q vs component q).
    """
    for r in runs:
        r.factors(module)  # a clear error naming the run if the module is missing
    out: dict[str, Any] = {"module": module, "self": {}, "pairs": []}
    for r in runs:
        m = r.factors(module)
        out["self"][r.name] = spectra.component_cosines(m.a, m.b, m.a, m.b).tolist()
    for i in range(len(runs)):
        mi = runs[i].factors(module)
        for j in range(i + 1, len(runs)):
            mj = runs[j].factors(module)
            c = spectra.component_cosines(mi.a, mi.b, mj.a, mj.b)
            out["pairs"].append(
                {
                    "runs": [runs[i].name, runs[j].name],
                    "matrix": c.tolist(),
                    "diagonal": np.diag(c).tolist(),
                }
            )
    return out


def clean(x: Any) -> Any:
    """A JSON-safe copy: numpy scalars to Python, NaN and infinities to None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


__all__ = [
    "analyze_run",
    "analyze_runs",
    "clean",
    "common_paths",
    "compare_modules",
    "compare_svds",
    "compare_runs",
    "cosine_study",
    "module_report",
    "pick_module",
    "run_info",
    "run_timeseries",
    "totals",
]
