"""Plots of a run's rank growth: rank and trainable parameters vs step (paper figure 1) and a
layer-by-matrix rank map (paper figure 3). Headless (Agg backend); PNG files.

Example:
    >>> # plot_rank_growth(history, sizes, "runs/demo/aroma/plots/rank_growth.png")
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from aroma_jax.core.history import History  # noqa: E402


def trainable_trajectory(
    history: History, pair_sizes: Mapping[str, int], head_params: int = 0
) -> tuple[list[int], list[int]]:
    """(steps, trainable parameters) from the outer-step records: a module stops costing
    trainable parameters at the step it is marked done."""
    stops = ("done",)
    done_at = {r["module"]: r["step"] for r in history.outer_steps if r["action"] in stops}
    steps = [s["step"] for s in history.steps]
    counts = [
        head_params + sum(n for p, n in pair_sizes.items() if done_at.get(p, 1 << 62) > step)
        for step in steps
    ]
    return steps, counts


def plot_rank_growth(
    history: History,
    pair_sizes: Mapping[str, int],
    path: str | Path,
    head_params: int = 0,
    title: str = "",
) -> Path:
    """Total rank and trainable parameters vs step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [s["step"] for s in history.steps]
    ranks = [s["total_rank"] for s in history.steps]
    _, trainable = trainable_trajectory(history, pair_sizes, head_params)
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(steps, ranks, color="tab:red", label="total rank")
    ax1.set_xlabel("step")
    ax1.set_ylabel("total rank (all modules)", color="tab:red")
    for s in history.outer_step_numbers():
        ax1.axvline(s, color="grey", alpha=0.15, lw=0.8)
    ax2 = ax1.twinx()
    ax2.plot(steps, trainable, color="tab:blue", label="trainable params")
    ax2.set_ylabel("trainable parameters", color="tab:blue")
    ax1.set_title(title or "AROMA rank growth (grey: outer steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layer_matrix_grid(ranks: Mapping[str, int]) -> tuple[list[int], list[str], np.ndarray]:
    """Splits module paths into (layer index, matrix name) and builds the rank grid.

    The layer index is the last numeric path component; the matrix name is what follows it
    (e.g. ``attention/self/query``). Paths without a number form layer -1.
    """
    raw: list[tuple[str, int, str, int]] = []
    for path, rank in ranks.items():
        parts = path.split("/")
        idx = max((i for i, p in enumerate(parts) if re.fullmatch(r"\d+", p)), default=None)
        if idx is None:
            raw.append(("", -1, path, rank))
        else:
            stack = next((p for p in parts[:idx] if p in ("encoder", "decoder")), "")
            raw.append((stack, int(parts[idx]), "/".join(parts[idx + 1 :]) or parts[idx - 1], rank))
    # Encoder-decoder models get "encoder:"/"decoder:" rows; single stacks plain names.
    two_stacks = len({r[0] for r in raw}) > 1
    cells: dict[tuple[int, str], int] = {}
    for stack, layer, matrix, rank in raw:
        cells[(layer, f"{stack}:{matrix}" if two_stacks and stack else matrix)] = rank
    layers = sorted({k[0] for k in cells})
    matrices = sorted({k[1] for k in cells})
    grid = np.full((len(matrices), len(layers)), np.nan)
    for (layer, matrix), rank in cells.items():
        grid[matrices.index(matrix), layers.index(layer)] = rank
    return layers, matrices, grid


def plot_rank_map(ranks: Mapping[str, int], path: str | Path, title: str = "") -> Path:
    """Heat map of final ranks: matrices (rows) by layer (columns), annotated."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers, matrices, grid = layer_matrix_grid(ranks)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(layers) + 3), max(2.5, 0.45 * len(matrices))))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(layers)), [str(x) for x in layers])
    ax.set_yticks(range(len(matrices)), matrices, fontsize=8)
    ax.set_xlabel("layer")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, int(grid[i, j]), ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=ax, label="rank")
    ax.set_title(title or f"final rank per module (total {int(np.nansum(grid))})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
