"""Where the factors come from: a finished run directory, or a live `TrainState`.

A `Run` knows each adapted module's shape and component count without holding any factor in
memory; `Run.factors` loads one module's ``A (in, k)`` and ``B (k, out)`` when asked (from the
run's ``final/adapters.safetensors`` through ``safe_open``, or from the device), so walking a
LLaMA-size run costs one module's factors at a time.

A module's *components* are its rank-one pieces ``s * a_q b_q^T``: column ``q`` of ``A`` and row
``q`` of ``B``. AROMA's are the merged pairs in merge order; LoRA's one merged block of rank
``r`` gives ``r`` components (its columns), which are not ordered in time.

Example:
    >>> run = open_run("runs/demo/aroma")  # doctest: +SKIP
    >>> m = run.factors(run.paths[0])  # doctest: +SKIP
    >>> m.a.shape[1] == run.shapes[run.paths[0]][2]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import yaml

# Short names of the usual target matrices (the paper's figure 3 axis), keyed by the path after
# the layer index: BERT/RoBERTa/MiniLM, LLaMA, BART/OPT.
MATRIX_LABELS = {
    "attention/self/query": "W_q",
    "attention/self/key": "W_k",
    "attention/self/value": "W_v",
    "attention/output/dense": "W_o",
    "intermediate/dense": "W_f1",
    "output/dense": "W_f2",
    "self_attn/q_proj": "W_q",
    "self_attn/k_proj": "W_k",
    "self_attn/v_proj": "W_v",
    "self_attn/o_proj": "W_o",
    "mlp/gate_proj": "W_gate",
    "mlp/up_proj": "W_up",
    "mlp/down_proj": "W_down",
    "fc1": "W_f1",
    "fc2": "W_f2",
}
MATRIX_ORDER = ("W_q", "W_k", "W_v", "W_o", "W_f1", "W_f2", "W_gate", "W_up", "W_down")


class Location(NamedTuple):
    """Where a module sits: ``stack`` (encoder/decoder or ""), ``layer`` (None when the path has
    no number), ``matrix`` (the path after the layer index) and its short ``label``."""

    stack: str
    layer: int | None
    matrix: str
    label: str


def locate(path: str) -> Location:
    """Parses a module path generically: the layer is the last all-digit component.

    >>> locate("bert/encoder/layer/3/attention/output/dense")
    Location(stack='encoder', layer=3, matrix='attention/output/dense', label='W_o')
    >>> locate("model/layers/5/self_attn/q_proj").label
    'W_q'
    """
    parts = path.split("/")
    idx = max((i for i, p in enumerate(parts) if re.fullmatch(r"\d+", p)), default=None)
    if idx is None:
        return Location("", None, path, MATRIX_LABELS.get(path, path))
    stack = next((p for p in parts[:idx] if p in ("encoder", "decoder")), "")
    matrix = "/".join(parts[idx + 1 :]) or parts[idx - 1]
    return Location(stack, int(parts[idx]), matrix, MATRIX_LABELS.get(matrix, matrix))


class ModuleFactors(NamedTuple):
    """One module's update ``dW = scale * a @ b``."""

    path: str
    a: np.ndarray  # (in, k)
    b: np.ndarray  # (k, out)
    scale: float


@dataclasses.dataclass(frozen=True)
class Run:
    """A run's adapted modules, metadata and history; factors load one module at a time.

    ``shapes[path] = (fan_in, fan_out, components)``; ``history`` is the dict of
    ``history.json`` (None when there is none); ``config`` the resolved run config (may be {}).
    """

    name: str
    source: str
    method: str
    r: int
    scale: float
    shapes: Mapping[str, tuple[int, int, int]]
    history: Mapping[str, Any] | None
    summary: Mapping[str, Any]
    config: Mapping[str, Any]
    loader: Callable[[str], tuple[np.ndarray, np.ndarray]] = dataclasses.field(repr=False)
    init_r: int | None = None  # AdaLoRA: triplets per module at the start

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(sorted(self.shapes))

    @property
    def ranks(self) -> dict[str, int]:
        """Nominal rank per module: its number of components."""
        return {p: self.shapes[p][2] for p in self.paths}

    @property
    def inner_tol(self) -> float | None:
        tol = (self.config.get("aroma") or {}).get("inner_tol")
        return None if tol is None else float(tol)

    def factors(self, path: str) -> ModuleFactors:
        if path not in self.shapes:
            raise KeyError(
                f"run {self.name!r} has no adapted module {path!r}; its modules: "
                + ", ".join(self.paths[:8])
                + (" ..." if len(self.paths) > 8 else "")
            )
        a, b = self.loader(path)
        return ModuleFactors(path, a, b, self.scale)

    def iter_factors(self) -> Iterator[ModuleFactors]:
        """Every module's factors in path order, one module in memory at a time."""
        for p in self.paths:
            yield self.factors(p)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def open_run(directory: str | Path, name: str | None = None) -> Run:
    """A run directory written by `aroma_jax.train.runner.train` (its ``final/`` artefact)."""
    from safetensors import safe_open

    directory = Path(directory)
    final = directory / "final"
    weights, meta_path = final / "adapters.safetensors", final / "meta.json"
    missing = [str(p) for p in (weights, meta_path) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"{str(directory)!r} is not a finished run directory (missing {missing}); analyze "
            "reads the final adapters that `aroma-jax train` writes when a run finishes"
        )
    from aroma_jax.train.artifacts import verify_final

    verify_final(final)  # a damaged file is a one-line error naming it and the remedy
    meta = json.loads(meta_path.read_text())
    for key in ("scale", "r", "paths"):
        if key not in meta:
            raise ValueError(f"{str(meta_path)!r} lacks {key!r}; was it written by aroma-jax?")
    shapes = {}
    with safe_open(str(weights), framework="np") as f:
        keys = set(f.keys())
        for p in meta["paths"]:
            ka, kb = f"frozen/{p}/a", f"frozen/{p}/b"
            if ka not in keys or kb not in keys:
                raise ValueError(f"{str(weights)!r} lacks the factors of module {p!r}")
            (fan_in, k), (_, fan_out) = f.get_slice(ka).get_shape(), f.get_slice(kb).get_shape()
            shapes[p] = (int(fan_in), int(fan_out), int(k))

    def loader(path: str) -> tuple[np.ndarray, np.ndarray]:
        with safe_open(str(weights), framework="np") as f:
            return f.get_tensor(f"frozen/{path}/a"), f.get_tensor(f"frozen/{path}/b")

    cfg_path = directory / "config.yaml"
    config = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
    return Run(
        name=name or directory.name,
        source=str(directory),
        method=str(meta.get("method", "aroma")),
        r=int(meta["r"]),
        scale=float(meta["scale"]),
        shapes=shapes,
        history=_read_json(directory / "history.json"),
        summary=_read_json(directory / "summary.json") or {},
        config=config or {},
        loader=loader,
        init_r=(meta.get("adalora") or {}).get("init_r"),
    )


def from_state(
    trainer: Any,
    state: Any,
    history: Any = None,
    name: str = "live",
    include_pair: bool = True,
) -> Run:
    """A `Run` over a live ``TrainState`` of ``trainer`` (an `AromaTrainer`).

    The update is the merged components, plus (``include_pair``) the pair in training as a last
    component when its module is not done and the pair is nonzero: mid-run that is part of
    ``dW``, and LoRA's whole update is its pair until `AromaTrainer.finalize`. ``history`` is a
    `History` or its dict.
    """
    cfg = trainer.cfg
    # One layer per entry (a scanned model's stacked adapters are sliced on the host).
    entries = trainer.unstacked(
        state.adapters._replace(
            merges=jax.device_get(state.adapters.merges), done=jax.device_get(state.adapters.done)
        )
    )
    merges = {p: int(m) for p, m in entries.merges.items()}
    done = {p: bool(d) for p, d in entries.done.items()}
    # A fresh pair has b = 0 (no update yet): it is no component. Fetch only the small b's.
    live = {
        p: include_pair and not done[p] and bool(np.any(jax.device_get(pair.b)))
        for p, pair in entries.pairs.items()
    }

    def loader(path: str) -> tuple[np.ndarray, np.ndarray]:
        k = merges[path] * cfg.r
        frozen, pair = jax.device_get((entries.frozen[path], entries.pairs[path]))
        a = np.asarray(frozen.a, np.float32)[:, :k]
        b = np.asarray(frozen.b, np.float32)[:k]
        if live[path]:
            a = np.concatenate([a, np.asarray(pair.a, np.float32)], 1)
            b = np.concatenate([b, np.asarray(pair.b, np.float32)], 0)
        return a, b

    shapes = {
        p: (
            trainer.entry_specs[p].fan_in,
            trainer.entry_specs[p].fan_out,
            merges[p] * cfg.r + (cfg.r if live[p] else 0),
        )
        for p in trainer.paths
    }
    if history is not None and not isinstance(history, Mapping):
        history = {**history.as_dict(), "steps": list(history.steps)}
    return Run(
        name=name,
        source="live TrainState",
        method=cfg.method,
        r=cfg.r,
        scale=float(cfg.scale),
        shapes=shapes,
        history=history,
        summary={},
        config={"aroma": {"inner_tol": cfg.inner_tol}},
        loader=loader,
    )


def unique_names(directories: Sequence[str | Path]) -> list[str]:
    """Short distinct names for runs: the directory name, with parents added until unique."""
    parts = [Path(d).resolve().parts for d in directories]
    depth = 1
    while True:
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth >= max(len(p) for p in parts):
            return names
        depth += 1


__all__ = [
    "MATRIX_LABELS",
    "MATRIX_ORDER",
    "Location",
    "ModuleFactors",
    "Run",
    "from_state",
    "locate",
    "open_run",
    "unique_names",
]
