"""Rank-growth history as data: every inner check and every outer step, per module.

The train step returns a small `StepInfo` per step; `History.extend` takes a batch of them
(fetched from the device in one transfer every few steps, not per step) and keeps only the
events. The records are plain dicts, ready for JSON lines, plots and analysis.

Example:
    >>> h = History(("layer0/query",))
    >>> h.as_dict()
    {'modules': ['layer0/query'], 'inner_checks': [], 'outer_steps': []}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def _num(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


class History:
    """Inner checks ``{step, module, rho_in, converged}`` and outer steps
    ``{step, module, rho_out, action, rank, trigger, inner_converged}``: ``converged`` is the
    check's eq. 5 label as the device computed it (`StepInfo.inner_label`); ``action`` is merged,
    done (eq. 6 stopped it; the pair is discarded) or full (capacity reached: the pair keeps
    training); ``trigger`` is ``eq5`` (every active module was inner-converged) or ``cap``
    (``inner_max_steps`` reached); ``inner_converged`` is the module's own eq. 5 label."""

    def __init__(self, paths: Sequence[str]):
        self.paths = tuple(paths)
        self.inner_checks: list[dict] = []
        self.outer_steps: list[dict] = []
        self.steps: list[dict] = []  # per logged step: step, loss, lr, total rank

    def extend(self, infos: Sequence[Any]) -> None:
        """Adds a batch of `StepInfo`s (device arrays are fetched in one call)."""
        if not infos:
            return
        infos = jax.device_get(list(infos))
        for info in infos:
            step = int(info.step)
            ranks = np.asarray(info.ranks)
            self.steps.append(
                {
                    "step": step,
                    "loss": float(info.loss),
                    "lr": float(info.lr),
                    "total_rank": int(ranks.sum()),
                }
            )
            if bool(info.checked):
                for i, p in enumerate(self.paths):
                    rho = _num(info.rho_in[i])
                    if rho is None:
                        continue
                    rec = {"step": step, "module": p, "rho_in": rho}
                    rec["converged"] = bool(info.inner_label[i])
                    self.inner_checks.append(rec)
            if bool(info.outer):
                for i, p in enumerate(self.paths):
                    rho = _num(info.rho_out[i])
                    if rho is None:
                        continue
                    if bool(info.merged[i]):
                        action = "merged"
                    elif bool(info.full[i]):
                        action = "full"
                    else:
                        action = "done" if bool(info.newly_done[i]) else "kept"
                    self.outer_steps.append(
                        {
                            "step": step,
                            "module": p,
                            "rho_out": rho,
                            "action": action,
                            "rank": int(ranks[i]),
                            "trigger": "cap" if bool(info.by_cap) else "eq5",
                            "inner_converged": bool(info.converged[i]),
                        }
                    )

    def outer_step_numbers(self) -> list[int]:
        return sorted({r["step"] for r in self.outer_steps})

    def rank_trajectory(self) -> dict[str, list[tuple[int, int]]]:
        """Per module, ``(step, rank)`` after each outer step."""
        out: dict[str, list[tuple[int, int]]] = {p: [] for p in self.paths}
        for r in self.outer_steps:
            out[r["module"]].append((r["step"], r["rank"]))
        return out

    def full_modules(self) -> list[str]:
        """Modules that reached their capacity (stopped merging, kept training their pair)."""
        return sorted({r["module"] for r in self.outer_steps if r["action"] == "full"})

    def inner_loop_endings(self) -> dict[str, int]:
        """How the run's inner loops ended: outer steps triggered by eq. 5 (every active module
        converged) or by the T_in cap, and module-level counts of converged/unconverged pairs."""
        outer = {}
        for r in self.outer_steps:
            outer[r["step"]] = r.get("trigger")
        mods = [r for r in self.outer_steps if "inner_converged" in r]
        return {
            "outer_by_eq5": sum(1 for v in outer.values() if v == "eq5"),
            "outer_by_cap": sum(1 for v in outer.values() if v == "cap"),
            "module_loops_converged": sum(1 for r in mods if r["inner_converged"]),
            "module_loops_capped": sum(1 for r in mods if not r["inner_converged"]),
        }

    def as_dict(self) -> dict:
        return {
            "modules": list(self.paths),
            "inner_checks": list(self.inner_checks),
            "outer_steps": list(self.outer_steps),
        }
