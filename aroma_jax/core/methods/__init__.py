"""PEFT methods as plug-ins: one module per method, one registry that names them.

A method is an object implementing `aroma_jax.core.methods.base.Method` (the protocol the
trainer, the runner, the exports and the analysis call: its state and init, its contribution to
a Dense call, an extra loss, what runs after the optimizer update, its eq. 6 stop rule, its ranks
and parameter counts, its export). The built-in ones, each in its own module here:

=========== ===================================================================================
``aroma``   adaptive rank-one growth: eq. 5 inner checks, eq. 6 stop or merge (`.aroma`)
``lora``    a fixed-rank pair, merged once at the end (`.lora`)
``relora``  merge and re-init every ``inner_max_steps``, no stopping criteria (`.relora`)
``dora``    LoRA with DoRA's magnitude and normalised direction (`.dora`)
``adalora`` SVD-form triplets pruned to a cubic budget (`.adalora`)
``head``    no adapter trained, only ``train_patterns`` (`.head`)
=========== ===================================================================================

A new method needs no edit of the package. Either register an instance under a name before the
config is built::

    from aroma_jax.core import methods
    methods.register("my-rule", MyRule())
    AromaConfig(target_modules=..., method="my-rule")

or name it by a dotted path ``"package.module:Attribute"`` (a `Method` subclass or instance),
which the config resolves by importing the module; this is what a run config uses
(``aroma: {method: aroma_jax.examples.custom_method:GrowWhileRatioHolds}``).

This module imports nothing of the project (the config looks methods up here while the method
modules import the config's types), so the registry can never take part in an import cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

# Built-in names -> "module:attribute", imported on first use.
BUILTIN = {
    "aroma": "aroma_jax.core.methods.aroma:Aroma",
    "lora": "aroma_jax.core.methods.lora:LoRA",
    "relora": "aroma_jax.core.methods.relora:ReLoRA",
    "head": "aroma_jax.core.methods.head:HeadOnly",
    "dora": "aroma_jax.core.methods.dora:DoRA",
    "adalora": "aroma_jax.core.methods.adalora:AdaLoRA",
}
_registered: dict[str, Any] = {}


class UnknownMethod(ValueError):
    """A method name that is neither registered nor an importable ``module:attribute`` path."""


def register(name: str, method: Any) -> Any:
    """Makes ``method`` (a `Method` instance, or a subclass: instantiated with no arguments)
    available as ``AromaConfig(method=name)``; returns the instance. Re-registering a name
    replaces it (a notebook may redefine its rule); built-in names cannot be replaced."""
    if name in BUILTIN:
        raise ValueError(f"method name {name!r} is built in; register yours under another name")
    instance = _instance(method, name)
    _registered[name] = instance
    return instance


def names() -> tuple[str, ...]:
    """Every name `get` accepts without a dotted path: built-ins first, then registered ones."""
    return tuple(BUILTIN) + tuple(n for n in _registered if n not in BUILTIN)


def get(name: str) -> Any:
    """The method object named ``name``: built-in, registered, or ``module:attribute``."""
    if name in _registered:
        return _registered[name]
    path = BUILTIN.get(name, name)
    if ":" not in path:
        raise UnknownMethod(
            f"unknown method {name!r}: accepted one of {names()}, or a dotted path "
            "'package.module:Attribute' to a Method subclass or instance"
        )
    module, _, attr = path.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UnknownMethod(
            f"method {name!r}: cannot import {attr!r} from module {module!r} ({e}); accepted "
            f"one of {names()}, or an importable 'package.module:Attribute'"
        ) from e
    _registered[name] = _instance(obj, name)
    return _registered[name]


def _instance(obj: Any, name: str) -> Any:
    if isinstance(obj, type):
        obj = obj()
    missing = [a for a in ("grows", "init_pairs", "outer_due", "stop") if not hasattr(obj, a)]
    if missing:
        raise UnknownMethod(
            f"method {name!r} is a {type(obj).__name__}, which lacks {missing}: accepted a "
            "subclass (or instance) of aroma_jax.core.methods.base.Method"
        )
    return obj


__all__ = ["BUILTIN", "UnknownMethod", "get", "names", "register"]
