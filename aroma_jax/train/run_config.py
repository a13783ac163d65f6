"""The experiment config of ``aroma-jax train``: YAML sections, ``--set`` overrides, validation.

A run config has five sections; every key is checked, and an unknown or mistyped key is an error
naming it and listing the valid ones::

    model:  {name: minilm, dtype: float32}
    task:   {name: rotten_tomatoes, max_len: 64, max_train_examples: null, max_eval_examples: 1000}
    train:  {batch_size: 32, eval_every: 100, seed: 0, ...}
    aroma:  {method: aroma, r: 1, alpha: 2.0, ...}      # AromaConfig fields
    mesh:   null                                          # e.g. "data=2,fsdp=2,tensor=2"

``aroma.target_modules`` defaults to the architecture's preset; ``aroma.max_steps`` is the step
budget of the run.

Example:
    >>> cfg = resolve({"model": {"name": "tiny-roberta"}, "task": {"name": "rotten_tomatoes"}},
    ...               ["train.batch_size=8", "aroma.r=2"])
    >>> cfg["train"]["batch_size"], cfg["aroma"]["r"]
    (8, 2)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from aroma_jax.core.config import AromaConfig, ConfigError, field_names

HEAD_MODES = ("train", "frozen", "paper")

SECTIONS: dict[str, dict[str, Any]] = {
    "model": {
        "name": "minilm",  # asset name, tiny-<arch>, HF hub name or local directory
        "dtype": "float32",  # compute dtype: float32 or bfloat16
        "param_dtype": "float32",  # dtype of the frozen base weights
        "num_labels": None,  # overrides the task's
        "impl": "auto",  # auto (native for LLaMA/Mistral/Qwen2, else hf) | native | hf
        # native models: layers under nn.scan, traced once (auto = true); HF Flax ones unroll
        "scan_layers": "auto",
        # native models: recompute activations in the backward pass (none | full | dots)
        "remat": "none",
        # a PEFT LoRA adapter directory to start from (frozen factors; LoRA: the pair)
        "init_adapter": None,
    },
    "task": {
        "name": "rotten_tomatoes",
        "max_len": 64,
        "target_max_len": 32,  # generation targets
        "max_train_examples": None,
        "max_eval_examples": None,
        "text_field": None,  # local files only
        "text_pair_field": None,
        "label_field": None,
        # class names in id order (local files, GLUE copies): text labels are mapped to ids by
        # this order (null: sorted); a run with text labels saves the order it used here
        "label_names": None,
        "bad_rows": "error",  # local files: an empty/NaN cell is an error, or "drop" the row
        # the paper's tasks (glue/<task>, commonsense170k, xsum): a hub name or a local copy in
        # the hub's schema; null = the usual hub dataset
        "source": None,
        "eval_source": None,  # commonsense170k: directory of the eight evaluation sets
        "dev_examples": 0,  # > 0: a seeded dev split of this many training rows (validation)
    },
    "train": {
        "batch_size": 32,
        "eval_batch_size": 64,
        "eval_every": 100,
        "log_every": 10,
        "save_every": 200,
        "keep_checkpoints": 2,
        "seed": 0,
        "train_head": True,  # legacy switch: false is head=frozen
        # train: the task head is trained in full (PEFT's modules_to_save); frozen: kept at its
        # (random) init; paper: the authors' RoBERTa setup, the head frozen but its dense layer
        # adapted like the other targets (their "dense" substring target matched it)
        "head": "train",
        "generate_max_len": 24,
        # generation search (seq2seq evaluation): beams, length penalty, minimum length and
        # no-repeat n-gram size (0 = off), as in HF's generate
        "num_beams": 1,
        "length_penalty": 1.0,
        "generate_min_len": 0,
        "no_repeat_ngram_size": 0,
        "eval_at_start": True,  # held-out metrics before training (the "before" of the run)
        "progress": True,
        "prefetch": 2,  # batches placed on their devices ahead of the step (0: none)
        # a validation metric (accuracy, mcc, pearson, rougeL, average, ...): keep the step
        # where it was highest as DIR/best, beside final/ (aroma_jax/train/best.py)
        "keep_best": None,
        # experiment trackers, besides TensorBoard: [wandb, mlflow] (aroma_jax/train/trackers.py)
        "trackers": [],
        "tracker_project": None,  # W&B project / MLflow experiment (null: "aroma-jax")
        "tracker_run_name": None,  # null: the run directory's name
        "tracker_dir": None,  # W&B dir / MLflow tracking URI (null: the tracker's own default)
    },
    "aroma": {},  # AromaConfig fields, validated by AromaConfig
    "mesh": None,
}


def defaults() -> dict[str, Any]:
    return copy.deepcopy(SECTIONS)


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _numbers(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; every user means the number."""
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def _parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars/lists: ``8``, ``1e-3``, ``true``, ``[query, value]``."""
    if text == "":
        return ""
    try:
        return _numbers(yaml.safe_load(text))
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"invalid --set value {text!r}: {problem}; accepted a YAML scalar or list, "
            "e.g. 8, 1e-3, true, [query, value]"
        ) from None


def apply_override(cfg: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"invalid --set {item!r}: accepted section.key=value, e.g. aroma.r=8")
    key, _, value = item.partition("=")
    parts = key.strip().split(".")
    if parts[0] == "mesh" and len(parts) == 1:
        cfg["mesh"] = _parse_value(value)
        return
    if len(parts) != 2:
        raise ConfigError(
            f"invalid --set key {key!r}: accepted section.key with a section in {sorted(SECTIONS)}"
        )
    section, name = parts
    if section not in SECTIONS or section == "mesh":
        raise ConfigError(
            f"unknown config section {section!r}: valid sections are {sorted(SECTIONS)}"
        )
    cfg.setdefault(section, {})[name] = _parse_value(value)


def _check_keys(section: str, values: Mapping[str, Any]) -> None:
    valid = field_names() if section == "aroma" else tuple(SECTIONS[section])
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in section {section!r}: valid keys are "
            f"{', '.join(sorted(valid))}"
        )


def resolve(raw: Mapping[str, Any] | None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Defaults <- file values <- ``--set`` overrides, every key validated."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"unknown config section(s) {unknown}: valid sections are {sorted(SECTIONS)}"
        )
    cfg = defaults()
    for section, values in raw.items():
        if section == "mesh":
            cfg["mesh"] = values
            continue
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
        cfg[section].update(_numbers(dict(values)))
    for item in overrides:
        apply_override(cfg, item)
    for section in ("model", "task", "train", "aroma"):
        _check_keys(section, cfg[section])
    for name in (
        "batch_size",
        "eval_batch_size",
        "eval_every",
        "log_every",
        "save_every",
        "keep_checkpoints",
    ):
        value = cfg["train"][name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"invalid train.{name}={value!r}: accepted an integer >= 1")
    value = cfg["train"]["prefetch"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"invalid train.prefetch={value!r}: accepted an integer >= 0")
    if cfg["train"]["head"] not in HEAD_MODES:
        raise ConfigError(
            f"invalid train.head={cfg['train']['head']!r}: accepted one of {HEAD_MODES}"
        )
    _check_generation_and_dev(cfg)
    _check_best_and_trackers(cfg["train"])
    _check_task(cfg["task"])
    n_labels = cfg["model"]["num_labels"]
    if n_labels is not None and (
        isinstance(n_labels, bool) or not isinstance(n_labels, int) or n_labels < 1
    ):
        raise ConfigError(
            f"invalid model.num_labels={n_labels!r}: accepted an integer >= 1 or null"
        )
    if not isinstance(cfg["model"]["name"], str) or not cfg["model"]["name"]:
        raise ConfigError(
            f"invalid model.name={cfg['model']['name']!r}: accepted an asset (minilm, smollm2), "
            "tiny-<arch>, a local directory or a hub name"
        )
    if cfg["model"]["impl"] not in ("auto", "native", "hf"):
        raise ConfigError(f"invalid model.impl={cfg['model']['impl']!r}: accepted auto, native, hf")
    if cfg["model"]["remat"] not in ("none", "full", "dots"):
        raise ConfigError(
            f"invalid model.remat={cfg['model']['remat']!r}: accepted none, full, dots"
        )
    if cfg["model"]["scan_layers"] not in ("auto", True, False):
        raise ConfigError(
            f"invalid model.scan_layers={cfg['model']['scan_layers']!r}: accepted auto, true, false"
        )
    if cfg["model"]["dtype"] not in ("float32", "bfloat16"):
        raise ConfigError(
            f"invalid model.dtype={cfg['model']['dtype']!r}: accepted float32, bfloat16"
        )
    if cfg["model"]["param_dtype"] not in ("float32", "bfloat16"):
        raise ConfigError(
            f"invalid model.param_dtype={cfg['model']['param_dtype']!r}: accepted float32, bfloat16"
        )
    return cfg


def _check_task(task: Mapping[str, Any]) -> None:
    """Lengths are integers >= 1, example caps integers >= 1 or null, bad_rows a policy."""
    for name in ("max_len", "target_max_len"):
        value = task[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"invalid task.{name}={value!r}: accepted an integer >= 1")
    for name in ("max_train_examples", "max_eval_examples"):
        value = task[name]
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ConfigError(f"invalid task.{name}={value!r}: accepted an integer >= 1 or null")
    if task["bad_rows"] not in ("error", "drop"):
        raise ConfigError(f"invalid task.bad_rows={task['bad_rows']!r}: accepted error, drop")
    names = task.get("label_names")
    if names is not None and (
        not isinstance(names, list)
        or len(names) < 2
        or not all(isinstance(n, (str, int)) and not isinstance(n, bool) for n in names)
        or len({str(n) for n in names}) != len(names)
    ):
        raise ConfigError(
            f"invalid task.label_names={names!r}: accepted a list of 2 or more distinct class "
            "names, in id order, or null"
        )
    if not isinstance(task["name"], str) or not task["name"]:
        raise ConfigError(f"invalid task.name={task['name']!r}: accepted a task name")


def _check_generation_and_dev(cfg: Mapping[str, Any]) -> None:
    """Generation-search and dev-split keys: integers in range, a finite length penalty."""
    limits = {
        ("train", "num_beams"): 1,
        ("train", "generate_min_len"): 0,
        ("train", "no_repeat_ngram_size"): 0,
        ("task", "dev_examples"): 0,
    }
    for (section, name), low in limits.items():
        value = cfg[section][name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"invalid {section}.{name}={value!r}: accepted an integer >= {low}")
    lp = cfg["train"]["length_penalty"]
    if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
        raise ConfigError(f"invalid train.length_penalty={lp!r}: accepted a finite number")


def _check_best_and_trackers(train: Mapping[str, Any]) -> None:
    """``keep_best`` a metric name or null (the task's metrics are checked when it is built);
    ``trackers`` a list of known trackers; the tracker options strings or null."""
    from aroma_jax.train.trackers import NAMES

    metric = train["keep_best"]
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise ConfigError(
            f"invalid train.keep_best={metric!r}: accepted a validation metric name (accuracy, "
            "mcc, pearson, rougeL, average, ...) or null"
        )
    names = train["trackers"]
    if (
        not isinstance(names, list)
        or any(n not in NAMES for n in names)
        or len(set(names)) != len(names)
    ):
        raise ConfigError(
            f"invalid train.trackers={names!r}: accepted a list of distinct names from {NAMES}, "
            "e.g. [wandb, mlflow], or []"
        )
    for key in ("tracker_project", "tracker_run_name", "tracker_dir"):
        value = train[key]
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"invalid train.{key}={value!r}: accepted a string or null")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps
    the last one silently, so ``model:`` twice would drop the first section unseen)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<`` merges are not duplicates
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    continue  # an unhashable key: the constructor reports it
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


def parse_yaml(path: Path) -> Any:
    """A YAML file's data; unreadable text or a syntax error is a `ConfigError` naming the file,
    line and column (1-based, as editors count)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {err.start}, line {line}): "
            "accepted a UTF-8 YAML file"
        ) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKey as dup:
        raise ConfigError(
            f"config file {str(path)!r} gives key {dup.key!r} twice, at lines {dup.first} and "
            f"{dup.second}: keep one (YAML would silently use the second)"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML:{where}: {detail}"
        ) from None


def load(path: str | Path | None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Reads a YAML run config (or none: the defaults) and applies overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        raw = parse_yaml(path) or {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return resolve(raw, overrides)


# Keys added after runs were first written, with the behaviour such a run had: a run directory
# whose config.yaml lacks one is resumed, evaluated and exported as it was trained.
LEGACY_DEFAULTS = {("model", "scan_layers"): False}


def adopt_legacy(cfg: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with `LEGACY_DEFAULTS` applied where the run's ``saved`` config lacks the key and
    ``cfg`` holds the current default (an explicit choice is kept, and then checked)."""
    out = copy.deepcopy(dict(cfg))
    for (section, key), value in LEGACY_DEFAULTS.items():
        old = saved.get(section)
        if (
            isinstance(old, Mapping)
            and key not in old
            and out[section][key] == SECTIONS[section][key]
        ):
            out[section][key] = value
    return out


def load_run(run_dir: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """A run directory's own config (`load` of its config.yaml, `adopt_legacy` applied)."""
    path = Path(run_dir) / "config.yaml"
    cfg = load(path, overrides)
    return adopt_legacy(cfg, parse_yaml(path) or {})


def head_mode(cfg: Mapping[str, Any]) -> str:
    """``train.head``, with the legacy ``train.train_head: false`` meaning ``frozen``."""
    mode = cfg["train"].get("head", "train")
    return "frozen" if mode == "train" and not cfg["train"]["train_head"] else mode


def aroma_config(
    cfg: Mapping[str, Any],
    preset_targets: tuple[str, ...],
    head_patterns: tuple[str, ...],
    head_adapters: tuple[str, ...] = (),
) -> AromaConfig:
    """The `AromaConfig` of a run: preset targets and the head unless the config says otherwise.

    ``head_patterns`` are trained in full under ``train.head: train``; ``head_adapters`` (the
    head's Dense layers) join the targets under ``train.head: paper``.
    """
    values = dict(cfg["aroma"])
    mode = head_mode(cfg)
    targets = tuple(preset_targets) + (tuple(head_adapters) if mode == "paper" else ())
    values.setdefault("target_modules", targets)
    if mode == "train":
        values.setdefault("train_patterns", tuple(head_patterns))
    values.setdefault("seed", cfg["train"]["seed"])
    return AromaConfig(**values)


def to_plain(cfg: Mapping[str, Any], aroma: AromaConfig | None = None) -> dict[str, Any]:
    """The resolved config as plain YAML/JSON data (with the full AromaConfig when given)."""
    out = copy.deepcopy(dict(cfg))
    if aroma is not None:
        out["aroma"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(aroma).items()
        }
    return out
