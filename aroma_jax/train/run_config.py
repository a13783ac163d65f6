"""The experiment config of ``aroma-jax train``: typed sections, ``--set`` overrides, migration.

A run config is one tree of typed sections, resolved and validated once, at load (`load`,
`resolve`), into a `RunConfig`; each component is handed its own section::

    model:     {name: minilm, dtype: float32}                       # ModelConfig
    task:      {name: rotten_tomatoes, max_len: 64}                  # TaskConfig
    train:     {batch_size: 32, eval_every: 100, seed: 0, ...}       # TrainConfig
    aroma:     {method: aroma, r: 1, alpha: 2.0, inner_tol: 0.1}     # the method's config class
    optimizer: {learning_rate: 5.0e-4, schedule: linear, ...}        # OptimizerConfig
    mesh:      null                                                  # e.g. "data=2,fsdp=2,tensor=2"

The ``aroma:`` section is typed by its method's ``config_class`` (`aroma_jax.core.methods`):
each method accepts only its own keys (LoRA has no ``outer_tol``; a plug-in method named by
dotted path brings its own class). An unknown or mistyped key is an error naming it and the
section's keys. A key of another built-in method (an ``outer_tol`` left in a config switched to
``method: lora``) is ignored with a warning. Keys renamed or moved since runs were first written
(`MOVED`: the optimizer's keys once lived under ``aroma:``) are migrated with a
`ConfigMigrationWarning` that names the new key, so old YAML files and run directories keep
working.

``aroma.target_modules`` defaults to the architecture's preset, ``aroma.train_patterns`` to the
task head (by ``train.head``), ``aroma.seed`` to ``train.seed``; ``aroma.max_steps`` is the step
budget of the run.

Example:
    >>> cfg = resolve({"model": {"name": "tiny-roberta"}, "task": {"name": "rotten_tomatoes"}},
    ...               ["train.batch_size=8", "aroma.r=2"])
    >>> cfg.train.batch_size, cfg.aroma.r, type(cfg.aroma).__name__
    (8, 2, 'AromaMethodConfig')
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from aroma_jax.core import config as core_config
from aroma_jax.core import methods
from aroma_jax.core.checks import (
    check_int,
    check_known,
    check_number,
    check_one_of,
    check_text,
    fail,
    is_int,
)
from aroma_jax.core.config import AromaConfig, CapacityWarning, ConfigError, OptimizerConfig

HEAD_MODES = ("train", "frozen", "paper")
SECTION_NAMES = ("model", "task", "train", "aroma", "optimizer", "mesh")


class ConfigMigrationWarning(UserWarning):
    """A config key that was renamed or moved, or one the chosen method does not have."""


def _one_of(field: str, value: Any, choices: tuple) -> None:
    """`check_one_of` with the choices listed as YAML writes them (``auto, true, false``)."""
    shown = ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in choices)
    check_one_of(field, value, choices, shown)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The ``model:`` section: which model, its dtypes and how it is built."""

    name: str = "minilm"  # asset name, tiny-<arch>, HF hub name or local directory
    dtype: str = "float32"  # compute dtype: float32 or bfloat16
    param_dtype: str = "float32"  # dtype of the frozen base weights
    num_labels: int | None = None  # overrides the task's
    impl: str = "auto"  # auto (native for LLaMA/Mistral/Qwen2, else hf) | native | hf
    # native models: layers under nn.scan, traced once (auto = true); HF Flax ones unroll
    scan_layers: str | bool = "auto"
    # native models: recompute activations in the backward pass (none | full | dots)
    remat: str = "none"
    # a PEFT LoRA adapter directory to start from (frozen factors; LoRA: the pair)
    init_adapter: str | None = None

    def __post_init__(self) -> None:
        check_text(
            "model.name",
            self.name,
            "an asset (minilm, smollm2), tiny-<arch>, a local directory or a hub name",
        )
        check_int("model.num_labels", self.num_labels, 1, none=True)
        _one_of("model.impl", self.impl, ("auto", "native", "hf"))
        _one_of("model.remat", self.remat, ("none", "full", "dots"))
        _one_of("model.scan_layers", self.scan_layers, ("auto", True, False))
        _one_of("model.dtype", self.dtype, ("float32", "bfloat16"))
        _one_of("model.param_dtype", self.param_dtype, ("float32", "bfloat16"))


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The ``task:`` section: the data set, its lengths and splits."""

    name: str = "rotten_tomatoes"
    max_len: int = 64
    target_max_len: int = 32  # generation targets
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    text_field: str | None = None  # local files only
    text_pair_field: str | None = None
    label_field: str | None = None
    # class names in id order (local files, GLUE copies): text labels are mapped to ids by
    # this order (null: sorted); a run with text labels saves the order it used here
    label_names: tuple[str | int, ...] | None = None
    bad_rows: str = "error"  # local files: an empty/NaN cell is an error, or "drop" the row
    # the paper's tasks (glue/<task>, commonsense170k, xsum): a hub name or a local copy in
    # the hub's schema; null = the usual hub dataset
    source: str | None = None
    eval_source: str | None = None  # commonsense170k: directory of the eight evaluation sets
    dev_examples: int = 0  # > 0: a seeded dev split of this many training rows (validation)
    # the training split tokenized up front (false), or each batch's rows when grain gathers
    # them (true; `aroma_jax.data.stream`); auto: streamed above 100,000 rows
    streaming: bool | str = "auto"

    def __post_init__(self) -> None:
        _check_task(self)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The ``train:`` section: batches, schedules of eval/log/save, the head, generation."""

    batch_size: int = 32
    eval_batch_size: int = 64
    eval_every: int = 100
    log_every: int = 10
    save_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0
    # train: the task head is trained in full (PEFT's modules_to_save); frozen: kept at its
    # (random) init; paper: the authors' RoBERTa setup, the head frozen but its dense layer
    # adapted like the other targets (their "dense" substring target matched it)
    head: str = "train"
    generate_max_len: int = 24
    # generation search (seq2seq evaluation): beams, length penalty, minimum length and
    # no-repeat n-gram size (0 = off), as in HF's generate
    num_beams: int = 1
    length_penalty: float = 1.0
    generate_min_len: int = 0
    no_repeat_ngram_size: int = 0
    eval_at_start: bool = True  # held-out metrics before training (the "before" of the run)
    progress: bool = True
    prefetch: int = 2  # batches placed on their devices ahead of the step (0: none)
    # micro-batches per optimizer step, summed inside the one compiled step (dividing
    # batch_size): the same run as one batch of batch_size, with activations of one micro-batch
    grad_accum: int = 1
    # a validation metric (accuracy, mcc, pearson, rougeL, average, ...): keep the step where it
    # was highest as DIR/best, beside final/ (aroma_jax/train/best.py; null: off)
    keep_best: str | None = None
    # experiment trackers, besides TensorBoard: [wandb, mlflow] (aroma_jax/train/trackers.py)
    trackers: tuple[str, ...] = ()
    tracker_project: str | None = None  # W&B project / MLflow experiment (null: "aroma-jax")
    tracker_run_name: str | None = None  # null: the run directory's name
    tracker_dir: str | None = None  # W&B dir / MLflow tracking URI (null: the tracker's default)

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size", "eval_every", "log_every", "save_every"):
            check_int(f"train.{name}", getattr(self, name), 1)
        check_int("train.keep_checkpoints", self.keep_checkpoints, 1)
        k = self.grad_accum
        if not is_int(k) or k < 1 or self.batch_size % k:
            fail(
                "train.grad_accum",
                k,
                "a positive integer dividing "
                f"train.batch_size={self.batch_size} (micro-batches of batch_size / grad_accum "
                "rows; 1 = none)",
            )
        check_int("train.prefetch", self.prefetch, 0)
        check_int("train.seed", self.seed, 0)
        check_one_of("train.head", self.head, HEAD_MODES)
        check_int("train.generate_max_len", self.generate_max_len, 1)
        check_int("train.num_beams", self.num_beams, 1)
        check_int("train.generate_min_len", self.generate_min_len, 0)
        check_int("train.no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        check_number("train.length_penalty", self.length_penalty, "a finite number")
        for name in ("eval_at_start", "progress"):
            _one_of(f"train.{name}", getattr(self, name), (True, False))
        check_text("train.keep_best", self.keep_best, "a metric name or null", none=True)
        from aroma_jax.train.trackers import NAMES

        trackers = self.trackers
        if isinstance(trackers, str):
            trackers = (trackers,)
        if (
            not isinstance(trackers, (list, tuple))
            or any(t not in NAMES for t in trackers)
            or len(set(trackers)) != len(trackers)
        ):
            fail(
                "train.trackers",
                self.trackers,
                f"a list of distinct names from {NAMES}, e.g. [wandb, mlflow], or []",
            )
        object.__setattr__(self, "trackers", tuple(trackers))
        for key in ("tracker_project", "tracker_run_name", "tracker_dir"):
            check_text(f"train.{key}", getattr(self, key), "a string or null", none=True)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run config, resolved once: one typed section per component."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    aroma: Any = dataclasses.field(default_factory=lambda: methods.get("aroma").config_class())
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: str | None = None  # a device mesh, "data=2,fsdp=2,tensor=2" (null: one device)

    def replace(self, **sections: Any) -> RunConfig:
        """A copy with whole sections replaced."""
        return dataclasses.replace(self, **sections)


_TYPED = {
    "model": ModelConfig,
    "task": TaskConfig,
    "train": TrainConfig,
    "optimizer": OptimizerConfig,
}
_OPTIMIZER_KEYS = tuple(f.name for f in dataclasses.fields(OptimizerConfig))

# Keys renamed or moved since runs were first written: old (section, key) -> new (section, key).
# `migrate` rewrites them with a warning naming the new key.
MOVED: dict[tuple[str, str], tuple[str, str]] = {
    **{("aroma", k): ("optimizer", k) for k in _OPTIMIZER_KEYS},
    ("train", "train_head"): ("train", "head"),  # a boolean once; false is head: frozen
}


def _moved_value(old: tuple[str, str], value: Any, target: Mapping[str, Any]) -> Any:
    """The value an old key means under its new name (``train_head: false`` is ``frozen``)."""
    if old == ("train", "train_head"):
        if value is False:
            return "frozen" if target.get("head", "train") == "train" else target["head"]
        return target.get("head", "train")
    return value


def migrate(plain: Mapping[str, Any], notes: list[str] | None = None) -> dict[str, Any]:
    """``plain`` (YAML data by section) with `MOVED` keys under their new names; each move is
    appended to ``notes`` (``"old -> new"``). A key given under both names is an error."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in plain.items()}
    for (section, key), (new_section, new_key) in MOVED.items():
        values = out.get(section)
        if not isinstance(values, dict) or key not in values:
            continue
        target = out.get(new_section)
        if target is None:
            target = out[new_section] = {}
        if not isinstance(target, dict):
            continue  # reported as a non-mapping section by `resolve`
        value = values.pop(key)
        if new_key in target and key != "train_head":
            raise ConfigError(
                f"config key {section}.{key} is given twice, under its old name and as "
                f"{new_section}.{new_key}: keep {new_section}.{new_key}"
            )
        target[new_key] = _moved_value((section, key), value, target)
        if notes is not None:
            notes.append(f"{section}.{key} -> {new_section}.{new_key}")
    return out


def _warn_moved(notes: list[str], where: str) -> None:
    if notes:
        warnings.warn(
            f"{where}: old config key(s) migrated: {', '.join(notes)}; write the new names",
            ConfigMigrationWarning,
            stacklevel=3,
        )


def default_plain(method: str = "aroma") -> dict[str, Any]:
    """The defaults of every section as YAML data (the ``aroma:`` section for ``method``)."""
    return to_plain(RunConfig(aroma=methods.get(method).config_class(method=method)))


def defaults() -> dict[str, Any]:
    """The default run config as YAML data."""
    return default_plain()


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


def apply_override(plain: dict, item: str, notes: list[str] | None = None) -> None:
    """One ``--set section.key=value`` written into ``plain`` (YAML data by section); an old
    key (`MOVED`) is written under its new name and noted."""
    if "=" not in item:
        raise ConfigError(f"invalid --set {item!r}: accepted section.key=value, e.g. aroma.r=8")
    key, _, value = item.partition("=")
    parts = key.strip().split(".")
    if parts[0] == "mesh" and len(parts) == 1:
        plain["mesh"] = _parse_value(value)
        return
    if len(parts) != 2:
        raise ConfigError(
            f"invalid --set key {key!r}: accepted section.key with a section in "
            f"{list(SECTION_NAMES[:-1])}, or mesh"
        )
    section, name = parts
    if section not in SECTION_NAMES or section == "mesh":
        raise ConfigError(
            f"unknown config section {section!r}: valid sections are {list(SECTION_NAMES)}"
        )
    parsed = _parse_value(value)
    if (section, name) in MOVED:
        new_section, new_name = MOVED[section, name]
        target = plain.setdefault(new_section, {})
        parsed = _moved_value((section, name), parsed, target)
        if notes is not None:
            notes.append(f"{section}.{name} -> {new_section}.{new_name}")
        section, name = new_section, new_name
    if not isinstance(plain.get(section), dict):
        plain[section] = {}
    plain[section][name] = parsed


def _section(cls: type, name: str, values: Mapping[str, Any]) -> Any:
    valid = [f.name for f in dataclasses.fields(cls)]
    message = f"unknown key(s) {{unknown}} in section {name!r}: valid keys are {', '.join(valid)}"
    check_known(values, valid, message)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)


def _other_methods_keys() -> set[str]:
    keys = set(core_config.field_names()) - {"options"}
    for name in methods.BUILTIN:
        keys |= {f.name for f in dataclasses.fields(methods.get(name).config_class)}
    return keys


def method_section(values: Mapping[str, Any], where: str = "config") -> Any:
    """The ``aroma:`` section as its method's ``config_class`` (keys checked against that
    method's fields; another built-in method's keys are ignored with a warning)."""
    name = values.get("method", "aroma")
    if not isinstance(name, str):
        fail("aroma.method", name, f"one of {methods.names()} or 'package.module:Attribute'")
    try:
        method = methods.get(name)
    except methods.UnknownMethod as e:
        raise ConfigError(f"invalid aroma.method={name!r}: {e}") from None
    cls = method.config_class
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    elsewhere = _other_methods_keys()
    bad = [k for k in unknown if k not in elsewhere]
    if bad:
        raise ConfigError(
            f"unknown key(s) {bad} in section 'aroma' for method {name!r}: its keys are "
            f"{', '.join(valid)}"
        )
    if unknown:
        warnings.warn(
            f"{where}: method {name!r} has no setting(s) {unknown} (another method's): ignored; "
            f"its keys are {', '.join(valid)}",
            ConfigMigrationWarning,
            stacklevel=3,
        )
    kept = {}
    for k in valid:
        if k in values:
            v = values[k]
            kept[k] = (
                (v,) if isinstance(v, str) and k in ("target_modules", "train_patterns") else v
            )
            if isinstance(kept[k], list):
                kept[k] = tuple(kept[k])
    return cls(**kept)


def _check_method(section: Any, optimizer: OptimizerConfig) -> None:
    """Every value of the method and optimizer sections, through `AromaConfig`'s validation
    (the targets and head are the model's, known only when it loads)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CapacityWarning)  # warned once, when the run builds
            core_config.build(
                section, optimizer, target_modules=("<preset>",), train_patterns=(), seed=0
            )
    except ConfigError as e:
        match = re.match(r"invalid (\w+)=", str(e))
        if match is None:
            raise
        field = match.group(1)
        where = "optimizer" if field in _OPTIMIZER_KEYS else "aroma"
        raise ConfigError(
            str(e).replace(f"invalid {field}=", f"invalid {where}.{field}=", 1)
        ) from None


def resolve(
    raw: Mapping[str, Any] | None, overrides: Iterable[str] = (), where: str = "config"
) -> RunConfig:
    """Defaults <- file values <- ``--set`` overrides, migrated (`MOVED`), typed and validated."""
    raw = dict(raw or {})
    message = f"unknown config section(s) {{unknown}}: valid sections are {list(SECTION_NAMES)}"
    check_known(raw, SECTION_NAMES, message)
    for section, values in raw.items():
        if section != "mesh" and values is not None and not isinstance(values, Mapping):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
    plain: dict[str, Any] = {
        k: _numbers(dict(v)) if isinstance(v, Mapping) else v for k, v in raw.items()
    }
    notes: list[str] = []
    plain = migrate(plain, notes)
    for item in overrides:
        apply_override(plain, item, notes)
    _warn_moved(notes, where)
    mesh = plain.get("mesh")
    if mesh is not None and not isinstance(mesh, str):
        fail("mesh", mesh, "axis=size pairs, e.g. data=2,fsdp=2, or null")
    sections = {name: _section(cls, name, plain.get(name) or {}) for name, cls in _TYPED.items()}
    cfg = RunConfig(**sections, aroma=method_section(plain.get("aroma") or {}, where), mesh=mesh)
    _check_method(cfg.aroma, cfg.optimizer)
    return cfg


def _check_task(task: TaskConfig) -> None:
    """Lengths are integers >= 1, example caps integers >= 1 or null, bad_rows a policy."""
    check_text("task.name", task.name, "a task name")
    for name in ("max_len", "target_max_len"):
        check_int(f"task.{name}", getattr(task, name), 1)
    for name in ("max_train_examples", "max_eval_examples"):
        check_int(f"task.{name}", getattr(task, name), 1, none=True)
    check_int("task.dev_examples", task.dev_examples, 0)
    _one_of("task.bad_rows", task.bad_rows, ("error", "drop"))
    if not (isinstance(task.streaming, bool) or task.streaming == "auto"):
        fail("task.streaming", _plain_value(task.streaming), "true, false or auto")
    names = task.label_names
    if names is not None and (
        not isinstance(names, (list, tuple))
        or len(names) < 2
        or not all(isinstance(n, (str, int)) and not isinstance(n, bool) for n in names)
        or len({str(n) for n in names}) != len(names)
    ):
        fail(
            "task.label_names",
            _plain_value(names),
            "a list of 2 or more distinct class names, in id order, or null",
        )
    if names is not None:
        object.__setattr__(task, "label_names", tuple(names))


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


def load(path: str | Path | None, overrides: Iterable[str] = ()) -> RunConfig:
    """Reads a YAML run config (or none: the defaults) and applies overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        raw = parse_yaml(path) or {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return resolve(raw, overrides, where=str(path) if path is not None else "config")


# Keys added after runs were first written, with the behaviour such a run had: a run directory
# whose config.yaml lacks one is resumed, evaluated and exported as it was trained.
LEGACY_DEFAULTS = {("model", "scan_layers"): False}


def adopt_legacy(cfg: RunConfig, saved: Mapping[str, Any]) -> RunConfig:
    """``cfg`` with `LEGACY_DEFAULTS` applied where the run's ``saved`` config (YAML data) lacks
    the key and ``cfg`` holds the current default (an explicit choice is kept, and checked)."""
    for (section, key), value in LEGACY_DEFAULTS.items():
        old = saved.get(section)
        current = getattr(cfg, section)
        default = getattr(type(current)(), key)
        if isinstance(old, Mapping) and key not in old and getattr(current, key) == default:
            cfg = cfg.replace(**{section: dataclasses.replace(current, **{key: value})})
    return cfg


def load_run(run_dir: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """A run directory's own config (`load` of its config.yaml, migrated, `adopt_legacy`
    applied): runs written before a key moved keep resuming, evaluating and exporting."""
    path = Path(run_dir) / "config.yaml"
    cfg = load(path, overrides)
    return adopt_legacy(cfg, parse_yaml(path) or {})


def method_config(
    cfg: RunConfig,
    preset_targets: tuple[str, ...],
    head_patterns: tuple[str, ...],
    head_adapters: tuple[str, ...] = (),
) -> AromaConfig:
    """The run's `AromaConfig`: its method and optimizer sections, with the preset targets and
    the head unless the method section names its own.

    ``head_patterns`` are trained in full under ``train.head: train``; ``head_adapters`` (the
    head's Dense layers) join the targets under ``train.head: paper``.
    """
    mode = cfg.train.head
    targets = tuple(preset_targets) + (tuple(head_adapters) if mode == "paper" else ())
    return core_config.build(
        cfg.aroma,
        cfg.optimizer,
        target_modules=targets,
        train_patterns=tuple(head_patterns) if mode == "train" else (),
        seed=cfg.train.seed,
    )


def _plain_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def to_plain(cfg: RunConfig, aroma: AromaConfig | None = None) -> dict[str, Any]:
    """The config as YAML data, every key of every section (``config.yaml`` of a run). With the
    run's ``aroma`` (`method_config`), the method section shows the targets, head patterns and
    seed it resolved to."""
    out: dict[str, Any] = {}
    for name in SECTION_NAMES[:-1]:
        section = getattr(cfg, name)
        out[name] = {
            f.name: _plain_value(getattr(section, f.name)) for f in dataclasses.fields(section)
        }
    if aroma is not None:
        for key in ("target_modules", "train_patterns", "seed"):
            out["aroma"][key] = _plain_value(getattr(aroma, key))
    out["mesh"] = cfg.mesh
    return copy.deepcopy(out)
