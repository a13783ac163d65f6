"""The paper's experiments, one command per table: run the presets, print ours beside the paper's.

    python -m experiments.paper table2 --tasks mrpc,rte --seeds 0,1,2 --out runs/paper
    python -m experiments.paper table3 --dry-run

Each cell is an ordinary ``aroma-jax train`` run directory (`aroma_jax.train.runner.train`)
under ``OUT/<preset>/seed<k>``, from a preset shipped in ``aroma_jax/configs/paper/`` (one YAML
per runnable row, each naming its source table). Runs are resumable: a finished run is read
back, not rerun; an interrupted one resumes from its last checkpoint. A run directory that holds
a run with a different config is an error, never silently reused. The printed table puts every
cell next to the paper's number (``paper/paper_numbers.yaml`` there); with several seeds a cell
is the mean, with the standard deviation after it.

``--dry-run`` trains nothing: it resolves every preset of the table and prints its plan (steps,
adapted modules, trainable parameters, the largest rank a module can reach and the memory of its
preallocated merge slots) from the model's shapes (`paper_plan`), no weights or hub needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from aroma_jax.configs import root
from experiments import paper_plan

PRESETS = root() / "paper"
NUMBERS = PRESETS / "paper_numbers.yaml"
GLUE = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")
GLUE_NAMES = dict(
    cola="CoLA", mnli="MNLI", mrpc="MRPC", qnli="QNLI", qqp="QQP", rte="RTE", sst2="SST-2"
) | {"stsb": "STS-B"}
SET_NAMES = {  # table 3's column order
    "ARC-Easy": "ARC-E",
    "openbookqa": "OBQA",
    "social_i_qa": "SIQA",
    "ARC-Challenge": "ARC-C",
    "winogrande": "WinoG",
    "piqa": "PIQA",
    "boolq": "BoolQ",
    "hellaswag": "HellaS",
}
SETS = tuple(SET_NAMES)


class PaperError(RuntimeError):
    """A bad table, task, seed list or run directory; the message says what is accepted."""


@dataclasses.dataclass(frozen=True)
class Table:
    title: str
    units: tuple[str, ...]  # what --tasks selects: GLUE tasks, commonsense sets, or one unit
    rows: tuple[tuple[str, str, str], ...]  # (numbers key, label, preset path with {u})
    per_unit_runs: bool  # one run per (row, unit); else one run per row covers every unit
    columns: Callable[[Sequence[str]], list[tuple[str, str]]]  # units -> (key, header)
    values: Callable[[dict, Path, Sequence[str], str | None], dict[str, float]]


def reported(summary: dict) -> dict:
    """The test metrics a table reports: those of the best validation step where the preset
    keeps one (``train.keep_best``: the GLUE presets, as the GLUE literature reports the best
    validation evaluation), else those of the final adapters."""
    best = summary.get("best")
    return best["metrics"] if best else summary["metrics"]


def _glue_values(summary, run_dir, units, unit):
    from aroma_jax.data.glue import GLUE_TASKS

    return {unit: 100 * reported(summary)[GLUE_TASKS[unit].metric]}


def _set_values(summary, run_dir, units, unit):
    m = summary["metrics"]
    return {s: 100 * m[s] for s in units if s in m}


def _rouge_values(summary, run_dir, units, unit):
    return {k: 100 * summary["metrics"][k] for k in ("rouge1", "rouge2", "rougeL")}


def _rank_columns(u: str) -> tuple[tuple[str, str], tuple[str, str]]:
    return (f"{u}_avg_r", f"{u.upper()} Avg r"), (u, f"{u.upper()} Acc")


def _rank_values(summary, run_dir, units, unit):
    ranks = list(summary["ranks"].values())
    return {f"{unit}_avg_r": sum(ranks) / len(ranks), unit: _glue_values(summary, 0, 0, unit)[unit]}


def initial_trainable(run_dir: Path) -> float:
    """Trainable parameters at the first logged step (the paper's #Param)."""
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == "train" and "trainable_params" in rec:
            return float(rec["trainable_params"])
    raise PaperError(f"{str(run_dir)!r} logged no training step")


def _loop_values(score: Callable[[dict], float]):
    def values(summary, run_dir, units, unit):
        return {
            "params": initial_trainable(run_dir),
            "outer_loops": float(summary["outer_steps"]),
            "accuracy": 100 * score(reported(summary)),
        }

    return values


_LOOP_COLUMNS = lambda units: [("params", "#Param"), ("outer_loops", "#Outer"), ("accuracy", "Acc")]

TABLES: dict[str, Table] = {
    "table2": Table(
        "Table 2: RoBERTa-base on GLUE (validation, best evaluation; MCC CoLA, Pearson STS-B, "
        "accuracy otherwise)",
        GLUE,
        (
            ("lora8", "LoRA r=8", "glue/lora8-{u}.yaml"),
            ("relora", "ReLoRA_1 x8", "glue/relora-{u}.yaml"),
            ("aroma", "AROMA", "glue/aroma-{u}.yaml"),
        ),
        True,
        lambda units: [(u, GLUE_NAMES[u]) for u in units] + [("avg", "Avg")],
        _glue_values,
    ),
    "table3": Table(
        "Table 3: LLaMA3-8B on Commonsense170K (accuracy)",
        SETS,
        (
            ("aroma_r1", "AROMA r=1", "commonsense/aroma-r1.yaml"),
            ("aroma_r8", "AROMA r=8", "commonsense/aroma-r8.yaml"),
        ),
        False,
        lambda units: [(u, SET_NAMES[u]) for u in units] + [("avg", "Avg")],
        _set_values,
    ),
    "table4": Table(
        "Table 4: BART-large on XSum (ROUGE F1, test)",
        ("xsum",),
        (("aroma_r1", "AROMA r=1", "xsum/aroma-r1.yaml"),),
        False,
        lambda units: [("rouge1", "Rouge1"), ("rouge2", "Rouge2"), ("rougeL", "RougeL")],
        _rouge_values,
    ),
    "table5": Table(
        "Table 5: AROMA with and without the optimizer reset, RoBERTa-base (avg rank, accuracy)",
        ("mrpc", "rte"),
        (
            ("noreset", "AROMA w/o Reset", "glue/noreset-{u}.yaml"),
            ("reset", "AROMA w/ Reset", "glue/aroma-{u}.yaml"),
        ),
        True,
        lambda units: [
            c for u in units for c in (_rank_columns(u))
        ],
        _rank_values,
    ),
    "table10": Table(
        "Table 10: inner-space rank, RoBERTa-base on MRPC",
        ("mrpc",),
        (
            ("r1", "AROMA r=1", "glue/aroma-mrpc.yaml"),
            ("r2", "AROMA r=2", "glue/rank2-mrpc.yaml"),
            ("r4", "AROMA r=4", "glue/rank4-mrpc.yaml"),
            ("r8", "AROMA r=8", "glue/rank8-mrpc.yaml"),
        ),
        False,
        _LOOP_COLUMNS,
        _loop_values(lambda m: m["accuracy"]),
    ),
    "table11": Table(
        "Table 11: inner-space rank, LLaMA3-8B on Commonsense170K (average accuracy)",
        ("commonsense170k",),
        (
            ("r1", "AROMA r=1", "commonsense/aroma-r1.yaml"),
            ("r8", "AROMA r=8", "commonsense/aroma-r8.yaml"),
        ),
        False,
        _LOOP_COLUMNS,
        _loop_values(lambda m: m["average"]),
    ),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RunSpec:
    row: str
    unit: str | None  # the GLUE task of a per-unit run
    preset: str  # path relative to PRESETS
    seed: int
    overrides: tuple[str, ...]
    run_dir: Path


def parse_list(text: str | None, accepted: Sequence[str], what: str) -> tuple[str, ...]:
    if not text:
        return tuple(accepted)
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in accepted]
    if bad or not items:
        raise PaperError(f"unknown {what} {bad or text!r}: accepted {', '.join(accepted)}")
    return items


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        seeds = ()
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise PaperError(f"invalid --seeds {text!r}: accepted distinct integers >= 0, e.g. 0,1,2")
    return seeds


def run_specs(table: Table, units, seeds, out: Path, overrides: Sequence[str]) -> list[RunSpec]:
    specs = []
    for row, _, pattern in table.rows:
        for unit in units if table.per_unit_runs else (None,):
            preset = pattern.format(u=unit)
            extra = tuple(overrides)
            sub = Path(preset).with_suffix("")
            if table is TABLES["table3"] and tuple(units) != SETS:
                # a subset of the evaluation sets is a different run
                extra = (f"task.name=commonsense170k/{','.join(units)}",) + extra
                sub = sub.with_name(sub.name + "-" + "-".join(units))
            for seed in seeds:
                run_dir = out / sub / f"seed{seed}"
                specs.append(RunSpec(row, unit, preset, seed, extra, run_dir))
    return specs


def resolve(spec: RunSpec) -> Any:
    from aroma_jax.train import run_config

    path = PRESETS / spec.preset
    return run_config.load(path, (f"train.seed={spec.seed}",) + spec.overrides)


def _same_config(cfg: Any, saved: dict) -> list[str]:
    """Keys where a saved run's config.yaml (of any layout, migrated) differs from ``cfg``
    (aroma: the keys cfg does not leave to the model, as the saved ones are resolved)."""
    from aroma_jax.train import run_config

    plain, saved = run_config.to_plain(cfg), run_config.migrate(saved)
    diffs = []
    for section in ("model", "task", "train", "optimizer", "aroma"):
        for k, v in plain[section].items():
            have = saved.get(section, {}).get(k)
            if (section, v) == ("aroma", None) or (
                k not in saved.get(section, {}) and section == "train"
            ):
                continue  # derived from the model, or a key added since the run was written
            if have != v:
                diffs.append(f"{section}.{k}: {have!r} != {v!r}")
    return diffs


def finished_summary(spec: RunSpec, cfg: dict) -> dict | None:
    """The summary of a finished run in ``spec.run_dir``, None if it has not finished."""
    saved_cfg = spec.run_dir / "config.yaml"
    if saved_cfg.exists():
        diffs = _same_config(cfg, yaml.safe_load(saved_cfg.read_text()) or {})
        if diffs:
            raise PaperError(
                f"{str(spec.run_dir)!r} holds a run with another config ({'; '.join(diffs[:5])}); "
                "choose another --out or remove that directory"
            )
    path = spec.run_dir / "summary.json"
    if path.exists():
        summary = json.loads(path.read_text())
        if summary.get("status") == "finished":
            return summary
    return None


def run(spec: RunSpec, log=print) -> dict:
    """Trains one cell unless it has finished; resumes an interrupted run."""
    from aroma_jax.train import runner

    cfg = resolve(spec)
    summary = finished_summary(spec, cfg)
    if summary is not None:
        log(f"done     {spec.run_dir}")
        return summary
    ckpts = spec.run_dir / "checkpoints"
    resume = ckpts.exists() and any(ckpts.iterdir())
    log(f"{'resume' if resume else 'train '}   {spec.run_dir}  ({spec.preset}, seed {spec.seed})")
    summary = runner.train(cfg, spec.run_dir, resume=resume)
    if summary.get("status") != "finished":
        raise PaperError(f"run {str(spec.run_dir)!r} stopped: {summary}")
    return summary


def collect(table: Table, units, specs: Sequence[RunSpec]) -> dict[str, dict[str, list[float]]]:
    """row -> column -> values over seeds, from finished runs only."""
    out: dict[str, dict[str, list[float]]] = {}
    for spec in specs:
        summary = finished_summary(spec, resolve(spec))
        if summary is None:
            continue
        values = table.values(summary, spec.run_dir, units, spec.unit)
        for k, v in values.items():
            out.setdefault(spec.row, {}).setdefault(k, []).append(v)
    return out


def _cell(values: list[float] | None, paper: Any, key: str) -> str:
    if key == "params":
        ours = paper_plan.human(values[0]) if values else "-"
    elif not values:
        ours = "-"
    elif len(values) == 1:
        ours = f"{values[0]:.2f}"
    else:
        ours = f"{statistics.mean(values):.2f}±{statistics.stdev(values):.2f}"
    return f"{ours} ({paper})" if paper is not None else ours


def format_table(name: str, units, results, numbers: dict, seeds) -> str:
    """Our table in the paper's layout; each cell ``ours (paper)``; ``-`` where no run finished."""
    table = TABLES[name]
    columns = table.columns(units)
    paper_rows = numbers.get(name, {})
    lines = [table.title, f"ours: mean over seeds {','.join(map(str, seeds))} (paper's number)"]
    header = ["Scheme"] + [h for _, h in columns]
    body = []
    for key, label, _ in table.rows:
        ours, paper = results.get(key, {}), paper_rows.get(key, {})
        cells = [label]
        for col, _ in columns:
            if col == "avg":
                # the mean over the chosen columns, for ours and the paper alike
                per_seed = [ours.get(u) for u in units]
                mine = (
                    [statistics.mean(v) for v in zip(*per_seed, strict=True)]
                    if all(per_seed)
                    else None
                )
                theirs = [paper.get(u) for u in units]
                ref = (
                    round(statistics.mean(theirs), 2)
                    if all(t is not None for t in theirs)
                    else None
                )
                if tuple(units) == tuple(table.units):
                    ref = paper.get("avg", ref)
                cells.append(_cell(mine, ref, col))
            else:
                cells.append(_cell(ours.get(col), paper.get(col), col))
        body.append(cells)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
    return "\n".join(lines + [fmt(header)] + [fmt(r) for r in body])


def format_plan(specs: Sequence[RunSpec], tiny: bool) -> str:
    head = [
        "preset",
        "task",
        "model",
        "method",
        "steps",
        "modules",
        "trainable",
        "max rank",
        "slots",
    ]
    rows, seen = [], set()
    for spec in specs:
        key = (spec.preset, spec.overrides)
        if key in seen:  # seeds share a plan
            continue
        seen.add(key)
        p = paper_plan.plan(resolve(spec), tiny=tiny)
        trainable = paper_plan.human(p.trainable) + (
            f" (head {paper_plan.human(p.head)})" if p.head else ""
        )
        rows.append(
            [spec.preset, p.task, p.model, p.method, str(p.steps), str(p.modules), trainable]
            + [str(p.max_rank), paper_plan.human_bytes(p.slot_bytes)]
        )
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
    return "\n".join([fmt(head)] + [fmt(r) for r in rows])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.paper",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Tables: " + "; ".join(f"{k}: {t.title}" for k, t in TABLES.items()),
    )
    p.add_argument("table", choices=sorted(TABLES), help="which of the paper's tables to run")
    p.add_argument(
        "--tasks",
        help="comma-separated subset of the table's columns: GLUE tasks for table2 "
        f"({','.join(GLUE)}), table5 (mrpc,rte); commonsense sets for table3 ({','.join(SETS)}); "
        "default all",
    )
    p.add_argument(
        "--seeds", default="0", help="comma-separated seeds, one run per seed (default 0)"
    )
    p.add_argument(
        "--out", default="runs/paper", help="root of the run directories (default runs/paper)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key in every run, e.g. task.source=/data/glue (repeatable)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="train nothing: print each preset's plan (steps, adapted modules, trainable "
        "parameters, largest rank, merge-slot memory) from the model's shapes",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="with --dry-run: plan on a tiny model of each architecture instead of the real one",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="train nothing: print the table from the runs that have finished under --out",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    table = TABLES[args.table]
    try:
        units = parse_list(args.tasks, table.units, "--tasks for " + args.table)
        seeds = parse_seeds(args.seeds)
        specs = run_specs(table, units, seeds, Path(args.out), args.set)
        if args.dry_run:
            print(f"{table.title}: plan ({len(specs)} runs: {len(seeds)} seed(s))")
            print(format_plan(specs, args.tiny))
            return 0
        if not args.report:
            for spec in specs:
                run(spec)
        numbers = yaml.safe_load(NUMBERS.read_text())
        print(format_table(args.table, units, collect(table, units, specs), numbers, seeds))
    except (PaperError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
