"""What a paper preset will do, without weights: steps, adapted modules, trainable parameters, rank.

`plan` builds the model's parameter *shapes* with ``jax.eval_shape`` of the HF Flax model's init
from a config (no weights are allocated or downloaded), matches the run's target patterns
against them exactly as training does (`aroma_jax.core.adapters.find_targets`), and counts.

The hub is not needed: the three models of the paper are described by their published
``config.json`` values in `experiments.shapes` (roberta-base, facebook/bart-large,
meta-llama/Meta-Llama-3-8B). ``tiny=True`` swaps in a small model of the same architecture (the
stand-in the tests build); ``tiny-<arch>`` model names always use it.

Example (from the checkout's root):
    >>> from aroma_jax.configs import config_path
    >>> from aroma_jax.train import run_config
    >>> cfg = run_config.load(config_path("paper/glue/aroma-mrpc.yaml"))
    >>> p = plan(cfg)
    >>> p.modules, p.trainable
    (73, 167424)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax

from experiments.shapes import HUB_NAMES, SHAPES, TINY


class PlanError(ValueError):
    """A preset that cannot be planned; the message names the model or task and what works."""


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str
    arch: str
    task: str
    method: str
    steps: int  # aroma.max_steps, the run's step budget T
    modules: int  # adapted Dense modules
    trainable: int  # initial trainable parameters: pairs plus any fully trained head
    max_rank: int  # the largest rank one module can reach (r x merge slots; r for LoRA)
    slot_bytes: int  # device memory of the preallocated fp32 frozen-factor slots
    base_params: int  # the frozen model's parameters
    head: int  # of ``trainable``: the fully trained head (0 unless train.head is "train")


def task_kind(name: str) -> tuple[str, int]:
    """(task kind, number of labels) of a paper task name, without loading data."""
    from aroma_jax.data.glue import GLUE_TASKS

    if name.startswith("glue/") and name[5:] in GLUE_TASKS:
        spec = GLUE_TASKS[name[5:]]
        return spec.kind, spec.num_labels
    if name == "commonsense170k" or name.startswith("commonsense170k/"):
        return "instruction", 0
    if name == "xsum":
        return "generation", 0
    raise PlanError(f"cannot plan task {name!r}: accepted glue/<task>, commonsense170k, xsum")


def model_config(name: str, tiny: bool, num_labels: int):
    """(arch, HF config) for a published model name or ``tiny-<arch>``."""
    import transformers as tf

    if name.startswith("tiny-"):
        arch = name[5:]
        tiny = True
    elif name in HUB_NAMES:
        arch = SHAPES[HUB_NAMES[name]][0]
    else:
        raise PlanError(
            f"no published config for model {name!r} here: accepted {', '.join(HUB_NAMES)} "
            "or tiny-<roberta|bart|llama>"
        )
    if arch not in TINY:
        raise PlanError(f"unknown architecture {arch!r}: accepted {', '.join(TINY)}")
    values = dict(SHAPES[TINY[arch] if tiny else HUB_NAMES[name]][1])
    cls = {"roberta": tf.RobertaConfig, "bart": tf.BartConfig, "llama": tf.LlamaConfig}[arch]
    return arch, cls(**values, num_labels=max(num_labels, 1))


def param_shapes(arch: str, config) -> Mapping[str, Any]:
    """The model's params as ``jax.ShapeDtypeStruct`` leaves (``eval_shape`` of its init)."""
    import transformers as tf

    from aroma_jax.models.hf import llama_class

    cls = {
        "roberta": tf.FlaxRobertaForSequenceClassification,
        "bart": tf.FlaxBartForConditionalGeneration,
        "llama": llama_class(),
    }[arch]
    model = cls(config, _do_init=False)
    return jax.eval_shape(lambda key: model.init_weights(key, (1, 8)), jax.random.key(0))


def _size(leaf) -> int:
    return math.prod(leaf.shape)


def plan(cfg: Any, tiny: bool = False) -> Plan:
    """The plan of a resolved run config (see the module docstring)."""
    from aroma_jax.core.adapters import find_targets
    from aroma_jax.core.train_step import split_params
    from aroma_jax.train.pipeline import aroma_for

    name, task = cfg.model.name, cfg.task.name
    kind, num_labels = task_kind(task)
    arch, config = model_config(name, tiny, cfg.model.num_labels or num_labels)
    if kind == "instruction" and arch != "llama":
        raise PlanError(f"task {task!r} needs a decoder-only LM (LLaMA), not {arch}")
    shapes = param_shapes(arch, config)
    aroma = aroma_for(cfg, arch, kind)
    specs = find_targets(shapes, aroma.target_modules)
    pairs = sum((s.fan_in + s.fan_out) * aroma.r for s in specs.values())
    head = sum(_size(x) for x in jax.tree.leaves(split_params(shapes, aroma.train_patterns)[1]))
    max_rank = aroma.r * aroma.rank_capacity_derived if aroma.grows else aroma.r
    return Plan(
        model=("tiny-" + arch) if tiny and not name.startswith("tiny-") else name,
        arch=arch,
        task=task,
        method=aroma.method,
        steps=aroma.max_steps,
        modules=len(specs),
        trainable=pairs + head,
        max_rank=max_rank,
        slot_bytes=4
        * aroma.r
        * aroma.rank_capacity_derived
        * sum(s.fan_in + s.fan_out for s in specs.values()),
        base_params=sum(_size(x) for x in jax.tree.leaves(shapes)),
        head=head,
    )


def human(n: float) -> str:
    """0.17M-style counts, as the paper prints them."""
    if n >= 1e12:
        return f"{n / 1e12:.2f}T"
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(int(n))


def human_bytes(n: float) -> str:
    """Bytes in decimal units (GB = 1e9 bytes)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
