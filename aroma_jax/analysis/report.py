"""``aroma-jax analyze``: a directory with ``report.md``, the figures and ``analysis.json``.

Example:
    >>> from aroma_jax.analysis.report import analyze  # doctest: +SKIP
    >>> runs = ["runs/demo/aroma", "runs/demo/lora"]
    >>> result = analyze(runs, "runs/demo/analysis")  # doctest: +SKIP
    >>> sorted(result["files"])  # doctest: +SKIP
    ['analysis.json', 'cosine.png', 'curves.png', 'rank_map.png', 'report.md', 'subspace.png']
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aroma_jax.analysis import figures, summary
from aroma_jax.analysis.runs import MATRIX_ORDER, Run, locate, open_run, unique_names

FIGURES = {
    "rank_map": "rank_map.png",
    "curves": "curves.png",
    "cosine": "cosine.png",
    "subspace": "subspace.png",
}


def build(runs: Sequence[Run], module: str | None = None) -> dict:
    """Every number of the report for ``runs`` (the content of ``analysis.json``)."""
    if not runs:
        raise ValueError("no runs to analyse: give at least one run directory")
    shared = summary.common_paths(runs)
    if module is None:
        # runs of different models share no module: their per-module figures are left out
        module = summary.pick_module(runs) if shared else None
    elif module not in shared:
        raise ValueError(
            f"--module {module!r} is not adapted in every run; modules all runs share: "
            + (", ".join(shared) if shared else "none")
        )
    reports, comparisons = summary.analyze_runs(runs, grid_module=module)
    return {
        "module": module,
        "runs": reports,
        "subspace": comparisons,
        "cosine": summary.cosine_study(runs, module) if module else None,
    }


def analyze(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    module: str | None = None,
    labels: Sequence[str] | None = None,
) -> dict:
    """Analyses finished run directories into ``out``; returns the analysis and file names."""
    if labels and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs; give one per run")
    names = list(labels) if labels else unique_names(run_dirs)
    if len(set(names)) != len(names):
        raise ValueError(f"run labels must be distinct; got {names}")
    runs = [open_run(d, n) for d, n in zip(run_dirs, names, strict=True)]
    return write(build(runs, module), out)


def write(analysis: dict, out: str | Path) -> dict:
    """Writes the figures, ``analysis.json`` and ``report.md`` of a `build` result."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures.plot_rank_map(analysis["runs"], out / FIGURES["rank_map"])
    drawn = ["rank_map"]
    if any(r["timeseries"] for r in analysis["runs"]):
        figures.plot_curves(analysis["runs"], out / FIGURES["curves"])
        drawn.append("curves")
    if analysis["module"]:
        figures.plot_cosines(analysis["cosine"], out / FIGURES["cosine"])
        drawn.append("cosine")
    if analysis["subspace"] and analysis["module"]:
        figures.plot_subspace(analysis["subspace"], analysis["module"], out / FIGURES["subspace"])
        drawn.append("subspace")
    (out / "analysis.json").write_text(json.dumps(summary.clean(analysis), indent=1))
    (out / "report.md").write_text(markdown(analysis, drawn))
    files = ["analysis.json", "report.md", *(FIGURES[k] for k in drawn)]
    return {**analysis, "files": sorted(files)}


def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _short(path: str, stacks: bool) -> str:
    """``3.W_v`` for a module (``enc 3.W_v`` when the model has two stacks)."""
    loc = locate(path)
    layer = "" if loc.layer is None else f"{loc.layer}."
    return (f"{loc.stack[:3]} " if stacks and loc.stack else "") + f"{layer}{loc.label}"


def _order(path: str) -> tuple:
    loc = locate(path)
    known = MATRIX_ORDER.index(loc.label) if loc.label in MATRIX_ORDER else len(MATRIX_ORDER)
    return (loc.stack, -1 if loc.layer is None else loc.layer, known, loc.matrix)


def _metrics(m: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {_f(v, 4)}" for k, v in m.items()) or "-"


def markdown(analysis: Mapping, drawn: Sequence[str]) -> str:
    """The human-readable report (every number comes from ``analysis``)."""
    runs = analysis["runs"]
    lines = [
        "# Rank-dynamics analysis",
        "",
        "Runs: " + ", ".join(f"`{r['name']}` ({r['source']})" for r in runs) + ".",
        "Definitions: docs/ANALYSIS.md. Every number below is in `analysis.json`.",
        "",
        "## Runs",
        "",
    ]
    rows = []
    for r in runs:
        t, ts = r["totals"], r["timeseries"] or {}
        trig = ts.get("triggers") or {}
        rows.append(
            [
                f"`{r['name']}`",
                r["method"],
                r["r"],
                _f(r["steps"]),
                t["total_rank"],
                _f(t["total_effective_rank"]),
                _pct(t["effective_rank_ratio"]),
                _pct(t["mean_effective_rank_ratio"]),
                _f(t["mean_rank"]),
                _f(t["mean_effective_rank"]),
                _f(t["mean_stable_rank"]),
                _f(ts.get("average_trained_params"), 1),
                _f(ts.get("initial_trained_params")),
                f"{trig.get('eq5', 0)}/{trig.get('cap', 0)}/{trig.get('unknown', 0)}"
                if trig
                else "-",
                _metrics(r["metrics"]),
            ]
        )
    lines += _table(
        [
            "run",
            "method",
            "r",
            "steps",
            "total rank",
            "total erank",
            "erank/rank",
            "mean module erank/rank",
            "avg rank",
            "avg erank",
            "avg stable rank",
            "avg trained params",
            "initial trained params",
            "inner loops eq5/cap/unknown",
            "test metrics",
        ],
        rows,
    )
    lines += [
        "",
        "erank/rank is the sum of effective ranks over the sum of ranks; the mean module ratio "
        "averages per-module ratios over modules of nonzero rank. Trained parameters count the "
        "adapter pairs only (not task heads).",
        "",
        "## Figures",
        "",
    ]
    captions = {
        "rank_map": "Rank (red) and effective rank (blue, number) per layer and matrix "
        "(paper figure 3)",
        "curves": "Trained parameters and total rank vs step (paper figure 1)",
        "cosine": f"Cosine similarity of rank-one components of `{analysis['module']}` "
        "(paper appendix E)",
        "subspace": f"Subspace similarity phi(i, j) of `{analysis['module']}` (LoRA paper, §7)",
    }
    for key in drawn:
        lines += [f"**{captions[key]}**", "", f"![{key}]({FIGURES[key]})", ""]
    lines += ["## Appendix E: component cosines", ""]
    pairs = analysis["cosine"]["pairs"] if analysis["cosine"] else []
    if not analysis["module"]:
        lines.append("The runs share no adapted module: no per-module comparison.")
    else:
        lines += [f"Module `{analysis['module']}`.", ""]
    if pairs:
        for p in pairs:
            diag = ", ".join(_f(x) for x in p["diagonal"])
            lines.append(f"- `{p['runs'][0]}` vs `{p['runs'][1]}`, diagonal: {diag or '-'}")
    elif analysis["module"]:
        lines.append("One run: the figure compares its components with each other.")
    lines += ["", "## Subspace similarity", ""]
    if analysis["subspace"]:
        lines += [
            "phi(k, k) over the top k = min(k1, k2) input-side singular directions of each "
            "module's update (1: same subspace; k/n for random k-dim subspaces of R^n).",
            "",
        ]
        lines += _table(
            ["runs", "mean over modules", "modules compared"],
            [
                [
                    f"`{c['runs'][0]}` vs `{c['runs'][1]}`",
                    _f(c["mean_similarity"], 3),
                    sum(1 for m in c["modules"].values() if m["similarity"] is not None),
                ]
                for c in analysis["subspace"]
            ],
        )
    else:
        lines.append("One run: nothing to compare.")
    for r in runs:
        lines += ["", f"## Modules of `{r['name']}`", ""]
        done = (r["timeseries"] or {}).get("done_at", {})
        stacks = len({m["stack"] for m in r["modules"].values()}) > 1
        mods = sorted(r["modules"].items(), key=lambda kv: _order(kv[0]))
        lines += _table(
            ["module", "rank", "erank", "erank/rank", "stable rank", "top-1 energy", "done at"],
            [
                [
                    _short(p, stacks),
                    m["rank"],
                    _f(m["effective_rank"]),
                    _pct(m["effective_rank_ratio"] if m["rank"] else None),
                    _f(m["stable_rank"]),
                    _pct(m["energy_top1"] if m["rank"] else None),
                    _f(done.get(p)),
                ]
                for p, m in mods
            ],
        )
    return "\n".join(lines) + "\n"


__all__ = ["FIGURES", "analyze", "build", "markdown", "write"]
