"""The report's figures, drawn from the dicts of `aroma_jax.analysis.summary` (headless, PNG).

* `plot_rank_map`: the paper's figure 3 layout: x = layer, y = matrix, a red circle sized by
  rank with a blue circle sized by effective rank inside it, the effective rank written in it.
* `plot_curves`: figure 1a/1b: trained adapter parameters and total rank against step, one line
  per run, the average trained parameters dashed.
* `plot_cosines`: Appendix E: cosines between rank-one components of one module.
* `plot_subspace`: the LoRA paper's figure 3: ``phi(i, j)`` between two runs' top directions.

Example:
    >>> # plot_rank_map([analyze_run(open_run("runs/x"))], "out/rank_map.png")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from aroma_jax.analysis.runs import MATRIX_ORDER  # noqa: E402

MAX_PANELS = 6  # run pairs drawn per figure; analysis.json holds every pair


def grid_cells(
    modules: Mapping[str, Mapping],
) -> tuple[list[int | None], list[str], dict[tuple[str, int | None], tuple[int, float]]]:
    """(layers, row names, ``{(row, layer): (rank, effective rank)}``) of one run's modules.

    Rows are the short matrix labels (W_q, ...); when two different matrices of a run share a
    label (e.g. BART's self- and cross-attention ``q_proj``) their full names are used, and a
    run with both an encoder and a decoder stack prefixes ``enc``/``dec``.
    """
    by_label: dict[tuple[str, str], set[str]] = {}
    for m in modules.values():
        by_label.setdefault((m["stack"], m["label"]), set()).add(m["matrix"])
    two_stacks = len({m["stack"] for m in modules.values()}) > 1
    cells = {}
    for m in modules.values():
        row = m["label"] if len(by_label[(m["stack"], m["label"])]) == 1 else m["matrix"]
        if two_stacks and m["stack"]:
            row = f"{m['stack'][:3]} {row}"
        cells[(row, m["layer"])] = (m["rank"], m["effective_rank"])
    layers = sorted({k[1] for k in cells}, key=lambda x: -1 if x is None else x)

    def order(row: str) -> tuple:
        stack, _, label = row.rpartition(" ")
        known = MATRIX_ORDER.index(label) if label in MATRIX_ORDER else len(MATRIX_ORDER)
        return (stack, known, label)

    rows = sorted({k[0] for k in cells}, key=order)
    return layers, rows, cells


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rank_map(reports: Sequence[Mapping], path: str | Path) -> Path:
    """One panel per run; circle areas share one scale across panels so runs compare."""
    grids = [grid_cells(r["modules"]) for r in reports]
    vmax = max([1] + [v[0] for _, _, cells in grids for v in cells.values()])
    width = max(len(g[0]) for g in grids)
    heights = [len(g[1]) for g in grids]
    fig, axes = plt.subplots(
        len(reports),
        1,
        figsize=(max(5.0, 0.75 * width + 2.5), sum(0.55 * h + 1.2 for h in heights)),
        gridspec_kw={"height_ratios": [h + 2 for h in heights]},
        squeeze=False,
    )
    area = 900.0  # points^2 of the largest circle
    for ax, rep, (layers, rows, cells) in zip(axes[:, 0], reports, grids, strict=True):
        xs, ys, rk, er = [], [], [], []
        for (row, layer), (rank, erank) in cells.items():
            xs.append(layers.index(layer))
            ys.append(rows.index(row))
            rk.append(rank)
            er.append(erank)
        rk_a, er_a = np.asarray(rk, float), np.asarray(er, float)
        ax.scatter(xs, ys, s=area * rk_a / vmax, c="#f4a6a6", edgecolors="tab:red", lw=1.0)
        ax.scatter(xs, ys, s=area * er_a / vmax, c="#9ec5ef", edgecolors="tab:blue", lw=0.8)
        # the rank's outline again on top: visible even where erank == rank covers its fill
        ax.scatter(xs, ys, s=area * rk_a / vmax, facecolors="none", edgecolors="tab:red", lw=1.0)
        for x, y, e in zip(xs, ys, er, strict=True):
            ax.text(x, y, f"{e:.1f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(layers)), ["-" if x is None else str(x) for x in layers])
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_xlim(-0.7, len(layers) - 0.3)
        ax.set_ylim(len(rows) - 0.4, -0.6)
        ax.set_xlabel("layer")
        t = rep["totals"]
        ratio = t["effective_rank_ratio"]
        ax.set_title(
            f"{rep['name']} ({rep['method']}): total rank {t['total_rank']}, effective "
            f"{t['total_effective_rank']:.1f}" + (f" ({100 * ratio:.1f}%)" if ratio else ""),
            fontsize=9,
        )
    fig.text(
        0.01,
        0.005,
        "red circle: rank; blue circle and number: effective rank (areas on one scale)",
        fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return _save(fig, path)


def plot_curves(reports: Sequence[Mapping], path: str | Path) -> Path:
    """Trained adapter parameters (top) and total rank (bottom) vs step, runs overlaid."""
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, rep in enumerate(reports):
        ts = rep["timeseries"]
        if ts is None:
            continue
        c = colors[i % len(colors)]
        ax1.plot(ts["steps"], ts["trained_params"], color=c, label=rep["name"])
        ax1.axhline(ts["average_trained_params"], color=c, ls="--", lw=0.9)
        ax2.plot(ts["steps"], ts["total_rank"], color=c, label=rep["name"])
    ax1.set_ylabel("trained adapter parameters")
    ax1.set_title("trained parameters (dashed: average over training) and total rank", fontsize=9)
    ax2.set_ylabel("total rank")
    ax2.set_xlabel("step")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _panels(n: int, size: float = 4.0):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 0.8, size * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _empty(ax, arr: np.ndarray) -> bool:
    """A module of rank 0 in a run has no components: say so instead of an empty image."""
    if arr.size:
        return False
    ax.text(0.5, 0.5, "rank 0: no components", ha="center", va="center", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return True


def _heat(ax, m: np.ndarray, vmin: float, vmax: float, cmap: str):
    if _empty(ax, m):
        return None
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest")
    if m.size and max(m.shape) <= 12:
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                r, g, b, _ = im.cmap(im.norm(v))  # white text on dark cells
                color = "w" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "k"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color=color)
    return im


def plot_cosines(study: Mapping, path: str | Path) -> Path:
    """Run i's components (rows) vs run j's (columns) for each pair; one run: with itself.
    Components are numbered in storage order: merge order for AROMA, columns for LoRA."""
    if study["pairs"]:
        panels = [(p["runs"][0], p["runs"][1], p["matrix"]) for p in study["pairs"]]
    else:
        panels = [(name, name, m) for name, m in study["self"].items()]
    panels = panels[:MAX_PANELS]
    fig, axes = _panels(len(panels))
    im = None
    for ax, (rows, cols, m) in zip(axes, panels, strict=True):
        arr = np.asarray(m, float).reshape(len(m), -1) if len(m) else np.zeros((0, 0))
        im = _heat(ax, arr, -1.0, 1.0, "RdBu_r") or im
        if arr.size:
            _component_ticks(ax, arr.shape)
        ax.set_ylabel(f"component of {rows}", fontsize=8)
        ax.set_xlabel(f"component of {cols}", fontsize=8)
    fig.suptitle(f"cosine similarity of rank-one components\n{study['module']}", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8)
    return _save(fig, path)


def _component_ticks(ax, shape: tuple[int, ...]) -> None:
    """1-based tick labels (component q / direction i counts from 1, as in the papers)."""
    step = lambda n: max(1, n // 16)
    ys, xs = range(0, shape[0], step(shape[0])), range(0, shape[1], step(shape[1]))
    ax.set_yticks(ys, [str(i + 1) for i in ys], fontsize=6)
    ax.set_xticks(xs, [str(j + 1) for j in xs], fontsize=6)


def plot_subspace(comparisons: Sequence[Mapping], module: str, path: str | Path) -> Path:
    """``phi(i, j)`` for ``module`` for each run pair (input-side singular directions)."""
    panels = [c for c in comparisons if c["modules"].get(module, {}).get("grid") is not None]
    panels = panels[:MAX_PANELS]
    fig, axes = _panels(max(len(panels), 1))
    im = None
    for ax, c in zip(axes, panels, strict=False):
        g = c["modules"][module]["grid"]
        arr = np.asarray(g, float).reshape(len(g), -1) if len(g) else np.zeros((0, 0))
        im = _heat(ax, arr, 0.0, 1.0, "viridis") or im
        if arr.size:
            _component_ticks(ax, arr.shape)
        ax.set_ylabel(f"i: top directions of {c['runs'][0]}", fontsize=8)
        ax.set_xlabel(f"j: top directions of {c['runs'][1]}", fontsize=8)
    if not panels:
        axes[0].text(0.5, 0.5, "one run: nothing to compare", ha="center", va="center")
        axes[0].axis("off")
    fig.suptitle(f"subspace similarity phi(i, j) of input-side directions\n{module}", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8)
    return _save(fig, path)


__all__ = ["grid_cells", "plot_cosines", "plot_curves", "plot_rank_map", "plot_subspace"]
