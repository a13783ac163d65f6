"""Time series from a run's ``history.json``: rank and trained parameters against step, the
eq. 5 / eq. 6 traces per module, and which criterion ended each inner loop.

The history (`aroma_jax.core.history.History`) holds one record per step (``steps``: step, loss,
lr, merged total rank), every inner check (``inner_checks``: step, module, rho_in, converged)
and every outer step (``outer_steps``: step, module, rho_out, action, rank; newer runs also
``trigger`` and ``inner_converged``). Everything here is a pure function of that dict.

Example:
    >>> h = {"steps": [{"step": s, "total_rank": 0} for s in (1, 2, 3, 4)],
    ...      "outer_steps": [{"step": 2, "module": "m", "rho_out": 0.0, "action": "done",
    ...                       "rank": 0}]}
    >>> steps, n = trained_params_series(h, {"m": (10, 6), "k": (4, 4)}, r=1)
    >>> n.tolist()  # m (16 params) is trained through step 2, k (8) throughout
    [24, 24, 8, 8]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from aroma_jax.core import methods

STOPS = ("done", "merged_full")  # outer-step actions after which a module trains no more


def _steps(history: Mapping[str, Any]) -> list[dict]:
    steps = history.get("steps") or []
    if not steps:
        raise ValueError(
            "the history has no per-step records ('steps'); runs written by aroma-jax "
            "`train` have them, a live History gets them from History.extend"
        )
    return steps


def done_steps(history: Mapping[str, Any]) -> dict[str, int]:
    """Per module, the step of the outer step that ended its training (absent: never)."""
    return {r["module"]: r["step"] for r in history.get("outer_steps", []) if r["action"] in STOPS}


def module_rank_series(history: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per module, ``(steps, merged rank after that outer step)``."""
    out: dict[str, tuple[list, list]] = {m: ([], []) for m in history.get("modules", [])}
    for r in history.get("outer_steps", []):
        s, k = out.setdefault(r["module"], ([], []))
        s.append(r["step"])
        k.append(r["rank"])
    return {m: (np.asarray(s, np.int64), np.asarray(k, np.int64)) for m, (s, k) in out.items()}


def total_rank_series(
    history: Mapping[str, Any], method: str, r: int, n_modules: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, total rank)``: the merged rank for AROMA and ReLoRA (the paper's figure 1b);
    LoRA trains rank ``r`` in every module from the start, so its curve is ``r * n_modules``."""
    recs = _steps(history)
    steps = np.asarray([s["step"] for s in recs], np.int64)
    recorded = np.asarray([s["total_rank"] for s in recs], np.int64)
    return steps, methods.get(method).total_rank_series(recorded, r, n_modules)


def pair_params(
    fan_in: int, fan_out: int, r: int, method: str = "aroma", init_r: int | None = None
) -> int:
    """Trained adapter parameters of one module's pair: ``r * (in + out)``; DoRA adds its
    magnitude (``out``); AdaLoRA trains ``init_r`` triplets (``P``, ``lambda``, ``Q``) whatever
    its budget keeps (pruned triplets still move under the orthogonality penalty, and PEFT
    counts them as trainable); head-only runs train none."""
    return methods.get(method).pair_params(fan_in, fan_out, r, init_r)


def trained_params_series(
    history: Mapping[str, Any],
    sizes: Mapping[str, tuple[int, int]],
    r: int,
    method: str = "aroma",
    init_r: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, adapter parameters trained at that step)`` (the paper's figure 1a).

    A module's pair (`pair_params`) is trained at every step up to and including the outer step
    that marks it done (that step's update is applied before the outer step runs); LoRA, ReLoRA,
    DoRA and AdaLoRA modules are never done, so their count is constant. Task heads are not
    counted.
    """
    steps = np.asarray([s["step"] for s in _steps(history)], np.int64)
    done = done_steps(history)
    counts = np.zeros(steps.shape, np.int64)
    for p, (fan_in, fan_out) in sizes.items():
        last = done.get(p)
        alive = steps <= last if last is not None else np.ones(steps.shape, bool)
        counts += alive * pair_params(fan_in, fan_out, r, method, init_r)
    return steps, counts


def average_trained_params(counts: np.ndarray) -> float:
    """The mean over steps of the trained parameters (each step weighs the same)."""
    counts = np.asarray(counts)
    if counts.size == 0:
        raise ValueError("no steps to average over")
    return float(counts.mean())


def inner_traces(history: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per module, ``(steps, rho_in)`` of every inner check (eq. 5; ``inf`` right after a
    re-init, where the previous norm is zero)."""
    out: dict[str, tuple[list, list]] = {}
    for r in history.get("inner_checks", []):
        s, v = out.setdefault(r["module"], ([], []))
        s.append(r["step"])
        v.append(r["rho_in"])
    return {m: (np.asarray(s, np.int64), np.asarray(v, np.float64)) for m, (s, v) in out.items()}


def outer_traces(history: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per module, ``(steps, rho_out)`` of every outer step it took part in (eq. 6)."""
    out: dict[str, tuple[list, list]] = {}
    for r in history.get("outer_steps", []):
        s, v = out.setdefault(r["module"], ([], []))
        s.append(r["step"])
        v.append(r["rho_out"])
    return {m: (np.asarray(s, np.int64), np.asarray(v, np.float64)) for m, (s, v) in out.items()}


def inner_loop_ends(history: Mapping[str, Any], inner_tol: float | None = None) -> list[dict]:
    """Per outer step: what ended the inner loop before it.

    Each entry: ``step``, ``length`` (steps since the previous outer step), ``trigger``
    (``"eq5"``: every active module was inner-converged; ``"cap"``: ``T_in`` was reached; None
    when unknown), ``source`` and ``not_converged`` (the active modules that were not).

    ``source`` is ``"recorded"`` when the outer-step records carry ``trigger`` /
    ``inner_converged``. Older runs lack them; then the labels are rebuilt from the inner checks
    (``"inferred"``): the controller's inner-converged label is sticky within an inner loop, so a
    module was converged at the outer step if any of its checks since the previous outer step
    had ``rho_in < inner_tol`` (the check's ``converged`` field, or ``inner_tol`` when the
    record lacks it). Without either, ``source`` is ``"unknown"``.
    """
    by_step: dict[int, list[dict]] = {}
    for r in history.get("outer_steps", []):
        by_step.setdefault(r["step"], []).append(r)
    checks: dict[str, list[tuple[int, bool | None]]] = {}
    for c in history.get("inner_checks", []):
        conv = c.get("converged")
        if conv is None and inner_tol is not None:
            conv = c["rho_in"] < inner_tol
        checks.setdefault(c["module"], []).append((c["step"], conv))
    out, prev = [], 0
    for step in sorted(by_step):
        recs = by_step[step]
        entry: dict[str, Any] = {"step": step, "length": step - prev, "active": len(recs)}
        if all("inner_converged" in r for r in recs):
            conv = {r["module"]: bool(r["inner_converged"]) for r in recs}
            source = "recorded"
        else:
            conv = {}
            for r in recs:
                flags = [f for s, f in checks.get(r["module"], []) if prev < s <= step]
                conv[r["module"]] = None if any(f is None for f in flags) else any(flags)
            source = "unknown" if any(v is None for v in conv.values()) else "inferred"
        recorded = {r.get("trigger") for r in recs} - {None}
        if len(recorded) == 1:
            trigger, source = recorded.pop(), "recorded"
        elif source == "unknown":
            trigger = None
        else:
            trigger = "eq5" if all(conv.values()) else "cap"
        entry.update(
            trigger=trigger,
            source=source,
            not_converged=sorted(m for m, v in conv.items() if v is False),
        )
        out.append(entry)
        prev = step
    return out


__all__ = [
    "average_trained_params",
    "pair_params",
    "done_steps",
    "inner_loop_ends",
    "inner_traces",
    "module_rank_series",
    "outer_traces",
    "total_rank_series",
    "trained_params_series",
]
