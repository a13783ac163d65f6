"""Logical axes of the native models, and their mapping onto the ``fsdp`` / ``tensor`` mesh.

Every param and the main activations have logical axis names (``embed``, ``heads``, ``kv``,
``mlp``, ``vocab``, ``batch``, ``length``); `LOGICAL_RULES` maps them to mesh axes the way
`aroma_jax.core.sharding` shards weights: the model width over ``fsdp``, heads / FFN width /
vocabulary over ``tensor``, the batch over ``data`` and ``fsdp``.

* `sharding_rules` turns the param table into `aroma_jax.core.sharding.Rule`s, so
  ``shard_trainer(trainer, state, mesh, sharding_rules())`` shards a native model (and its
  adapters and optimizer state, which inherit from the kernels) by logical axes.
* Scanned layers (``scan_layers=True``: ``model/layers/<sub-path> (L, ...)``): the leading
  ``layers`` axis is replicated and the others are named as in the unrolled leaf
  (`SCANNED_PARAM_AXES`, matched first by `param_logical_axes` and `sharding_rules`), so one
  rule set serves both layouts.
* `activation_rules` is the same mapping for ``flax.linen.logical_axis_rules``: inside
  ``with jax.set_mesh(mesh), nn.logical_axis_rules(activation_rules(mesh)):`` the model's
  ``with_logical_constraint`` calls pin its activations; outside, they are no-ops.

Example:
    >>> [r.axes for r in sharding_rules() if "q_proj/kernel" in r.pattern]
    [(None, 'fsdp', 'tensor'), ('fsdp', 'tensor')]
    >>> param_logical_axes("model/layers/mlp/down_proj/kernel")
    ('layers', 'mlp', 'embed')
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from aroma_jax.core.sharding import Rule

# logical name -> mesh axis (None: replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),  # the stacked layer axis of scanned params
)

# param path (regex, searched) -> logical names, one per array axis
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"self_attn/q_proj/kernel$", ("embed", "heads")),
    (r"self_attn/(k_proj|v_proj)/kernel$", ("embed", "kv")),
    (r"self_attn/q_proj/bias$", ("heads",)),
    (r"self_attn/(k_proj|v_proj)/bias$", ("kv",)),
    (r"self_attn/o_proj/kernel$", ("heads", "embed")),
    (r"self_attn/o_proj/bias$", ("embed",)),
    (r"mlp/(gate_proj|up_proj)/kernel$", ("embed", "mlp")),
    (r"mlp/(gate_proj|up_proj)/bias$", ("mlp",)),
    (r"mlp/down_proj/kernel$", ("mlp", "embed")),
    (r"mlp/down_proj/bias$", ("embed",)),
    (r"embed_tokens/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"norm/weight$", ("norm",)),
)

# BERT / RoBERTa (`aroma_jax.models.native.bert`): ``encoder/layer/<i>/...`` unrolled,
# ``encoder/layer/...`` with a leading layer axis when scanned.
_ENCODER_LAYER = (
    (r"attention/self/(query|key|value)/kernel$", ("embed", "heads")),
    (r"attention/self/(query|key|value)/bias$", ("heads",)),
    (r"attention/output/dense/kernel$", ("heads", "embed")),
    (r"intermediate/dense/kernel$", ("embed", "mlp")),
    (r"intermediate/dense/bias$", ("mlp",)),
    (r"output/dense/kernel$", ("mlp", "embed")),  # the FFN output: right after the layer
)
ENCODER_PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    *((r"encoder/layer/\d+/" + p, names) for p, names in _ENCODER_LAYER),
    (r"word_embeddings/embedding$", ("vocab", "embed")),
    (r"(position|token_type)_embeddings/embedding$", (None, "embed")),
)
ENCODER_SCANNED_PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (r"encoder/layer/" + p, ("layers", *names)) for p, names in _ENCODER_LAYER
)

LAYER_AXIS = "layers"
# scanned layer leaves: ``layers/`` directly followed by a module name (not a layer index)
SCANNED_PREFIX = r"(^|/)layers/"
_LAYER_NORMS = r"(\w+_layernorm|self_attn/[qk]_norm)/weight$"
SCANNED_PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (SCANNED_PREFIX + pattern, (LAYER_AXIS, *names))
    for pattern, names in PARAM_AXES
    if pattern.startswith(("self_attn/", "mlp/"))
) + ((SCANNED_PREFIX + _LAYER_NORMS, (LAYER_AXIS, "norm")),)


# BART (`aroma_jax.models.native.bart`): q/k/v of self_attn follow the LLaMA rules above
_BART_LAYER = (
    (r"encoder_attn/(q_proj|k_proj|v_proj)/kernel$", ("embed", "heads")),
    (r"encoder_attn/(q_proj|k_proj|v_proj)/bias$", ("heads",)),
    (r"(self_attn|encoder_attn)/out_proj/kernel$", ("heads", "embed")),
    (r"fc1/kernel$", ("embed", "mlp")),
    (r"fc1/bias$", ("mlp",)),
    (r"fc2/kernel$", ("mlp", "embed")),
)
BART_PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    *((r"layers/\d+/" + p, names) for p, names in _BART_LAYER),
    *((SCANNED_PREFIX + p, (LAYER_AXIS, *names)) for p, names in _BART_LAYER),
    (r"shared/embedding$", ("vocab", "embed")),
    (r"embed_positions/embedding$", (None, "embed")),
)


def all_param_axes() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The scanned table, then the unrolled one (first match wins; they never overlap on a
    leaf, since unrolled layer leaves have a layer index after ``layers/``)."""
    return (
        SCANNED_PARAM_AXES
        + ENCODER_PARAM_AXES
        + ENCODER_SCANNED_PARAM_AXES
        + BART_PARAM_AXES
        + PARAM_AXES
    )


def param_logical_axes(path: str) -> tuple[str, ...] | None:
    """The logical names of a param leaf ("/"-joined path), one per array axis; None for a
    leaf no rule names (replicated)."""
    for pattern, names in all_param_axes():
        if re.search(pattern, path):
            return names
    return None


def mesh_axis(logical: str) -> str | tuple[str, ...] | None:
    """The mesh axis of a logical axis name."""
    rules = dict(LOGICAL_RULES)
    if logical not in rules:
        raise ValueError(f"unknown logical axis {logical!r}: accepted {sorted(rules)}")
    return rules[logical]


def sharding_rules() -> tuple[Rule, ...]:
    """`Rule`s for `aroma_jax.core.sharding` from the logical param axes (single mesh axes),
    for the unrolled and the scanned layout alike."""
    out = []
    for pattern, names in all_param_axes():
        axes = []
        for n in names:
            ax = None if n is None else mesh_axis(n)
            axes.append(ax if isinstance(ax, str) or ax is None else ax[0])
        out.append(Rule(pattern, tuple(axes)))
    return tuple(out)


def activation_rules(mesh=None) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Rules for ``flax.linen.logical_axis_rules`` (activations' logical constraints); with a
    ``mesh``, mesh axes it lacks (e.g. ``data`` on an fsdp x tensor mesh) are dropped."""
    if mesh is None:
        return LOGICAL_RULES
    present = set(mesh.axis_names)

    def keep(ax):
        if ax is None or isinstance(ax, str):
            return ax if ax in present else None
        kept = tuple(a for a in ax if a in present)
        return kept or None

    return tuple((name, keep(ax)) for name, ax in LOGICAL_RULES)


def activation_context(mesh) -> contextlib.ExitStack:
    """``mesh`` as the ambient mesh and `activation_rules` as flax's logical-axis rules: a
    step traced inside it (``jit(...).lower`` or its first call) pins the native model's
    activations, batch over ``data``/``fsdp`` and width replicated over ``fsdp``. Without it the
    model's ``with_logical_constraint`` calls are no-ops, and XLA's partitioner carries the
    weights' ``fsdp``-sharded width into the activations: on LLaMA-3-8B under fsdp=8 that
    replicates the batch and all-reduces activation-sized partial sums (docs/SCALE.md)."""
    import flax.linen as nn
    import jax

    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(activation_rules(mesh)))
    return stack


def step_context(model: Any, mesh: Any) -> contextlib.AbstractContextManager:
    """The context a train step of ``model`` on ``mesh`` is traced and run in: `activation_context`
    for a native LLaMA-family model (`NativeCausalLM`) on a mesh, else nothing. A fresh one per
    use (an entered `activation_context` cannot be re-entered).

    Run every call of the step inside it, not only the first: the ambient mesh is part of jit's
    cache key, so a call outside it would trace the step again, unpinned. The native encoders
    and BART are left out: under these rules a tiny RoBERTa run on ``data=2,fsdp=2,tensor=2``
    drifted from its one-device losses by 5e-5 relative within 4 steps, while without them it
    stays within 1e-5 (docs/SHARDING.md); that was not investigated."""
    from aroma_jax.models.native.causal_lm import NativeCausalLM

    if mesh is None or not isinstance(model, NativeCausalLM):
        return contextlib.nullcontext()
    return activation_context(mesh)
