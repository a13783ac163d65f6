"""AROMA (and every other method) on a Flax NNX model: `NnxTrainer`.

The train step stays the one pure, jitted function of `aroma_jax.core.train_step`: the NNX
module is split once (``nnx.split``) into its graph definition, its ``nnx.Param`` leaves and
the rest of its state; the step sees the params as a plain nested dict (the same tree the linen
path sees, so the target rules, the adapter state, the sharding rules and the one compile are
the same code), and the loss rebuilds a *fresh* module from that dict with ``nnx.merge`` at
trace time and calls your ``loss_fn(module, batch, rng)`` on it.

How the adapters reach the layers. Flax NNX has no counterpart of
``flax.linen.intercept_methods``. The fresh module that ``nnx.merge`` builds inside the step
belongs to us, so each of its adaptable layers gets a subclass of its own class (made once per
class) whose ``__call__`` calls the original and then hands ``x``, ``y`` and the kernel to the
running `aroma_jax.core.inject.adapters_applied` block, which adds ``s * (x @ a) @ b`` from the
factors exactly as it does for a linen ``Dense`` (`inject.active_hook`). The layer also gets a
static attribute with its path. Your module is never touched: no class is patched, no
attribute of your objects changes, and ``nnx.state(model)`` is bitwise the same after training
(tests/core/test_nnx_adapt.py checks it). The class and the path are graph metadata of the
copy, so they survive NNX transforms that split and merge inside the model (``nnx.remat``).

Adaptable layers: ``nnx.Linear``; ``nnx.LinearGeneral`` contracting trailing input axes
without batch axes; and einsum layers, ``nnx.Einsum`` or any module with an ``einsum_str``
attribute and one ``Param`` named ``kernel`` or ``w`` (tunix's ``Einsum``), whose equation
contracts the input's trailing axes with the kernel's leading ones, ``"...C,CF->...F"`` (e.g.
``BTD,DNH->BTNH``, ``BTNH,NHD->BTD``). Their weight appears in the params as ``kernel``,
viewed as ``(fan_in, fan_out)`` like a DenseGeneral kernel. Other einsums (batch axes in the
kernel, permuted outputs) are listed in `NnxModel.skipped` and refused as targets.

Not covered: layer stacks run under ``nnx.scan`` (one module for all layers; the linen path's
``stacked=`` has no NNX counterpart yet). Non-``Param`` state (RNG counters, caches, batch
statistics) enters the step as constants and is not updated by it; draw randomness from the
``rng`` argument of ``loss_fn`` (e.g. ``nnx.reseed(module, dropout=rng)``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from aroma_jax import AromaConfig, NnxTrainer
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.up = nnx.Linear(8, 16, rngs=rngs)
    ...         self.down = nnx.Linear(16, 4, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.down(jax.nn.relu(self.up(x)))
    >>> net = Net(nnx.Rngs(0))
    >>> def loss_fn(model, batch, rng):
    ...     return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
    >>> cfg = AromaConfig(target_modules=("up", "down"), max_steps=10, warmup_steps=0)
    >>> trainer = NnxTrainer(net, loss_fn, cfg)
    >>> state = trainer.init()
    >>> batch = {"x": jnp.ones((2, 8)), "y": jnp.zeros((2, 4))}
    >>> state, info = trainer.step(state, batch)
    >>> int(info.step), trainer.compiles
    (1, 1)
    >>> with trainer.adapted(state) as tuned:  # a fresh NNX module that applies the adapters
    ...     y = tuned(batch["x"])
    >>> y.shape
    (2, 4)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
from flax import nnx, traverse_util

from aroma_jax.core import adapters as adapters_lib
from aroma_jax.core import inject
from aroma_jax.core.config import AromaConfig, ConfigError
from aroma_jax.core.train_step import AromaTrainer, TrainState

Array = jax.Array
PATH_ATTR = "aroma_path"  # the static attribute naming an adapted layer of the fresh copy
_EINSUM_WEIGHTS = ("kernel", "w")


def einsum_in_ndim(equation: str) -> int | None:
    """How many input axes an einsum layer contracts, or ``None`` when the adapter cannot follow
    it: accepted is ``"<lead><C>,<C><F>-><lead><F>"`` (the input's trailing axes ``C``
    contracted with the kernel's leading axes, the kernel's remaining axes ``F`` last in the
    output, in order; ``lead`` may be ``...``).

    >>> einsum_in_ndim("BTD,DNH->BTNH"), einsum_in_ndim("BTNH,NHD->BTD")
    (1, 2)
    >>> einsum_in_ndim("BTD,KDNH->KBTNH") is None
    True
    """
    m = re.fullmatch(r"([\w.]+),(\w+)->([\w.]+)", equation.replace(" ", ""))
    if m is None:
        return None
    lhs, rhs, out = m.groups()
    for c in range(1, len(rhs)):
        contracted, features = rhs[:c], rhs[c:]
        lead = lhs[: len(lhs) - c]
        if (
            lhs.endswith(contracted)
            and out == lead + features
            and not set(lead.replace(".", "")) & set(rhs)
            and contracted not in out
        ):
            return c
    return None


def _layout(module: nnx.Module) -> tuple[str, int] | str:
    """``(weight attribute, in_ndim)`` of an adaptable layer, else why it is not one."""
    if isinstance(module, nnx.Linear):
        return "kernel", 1
    if isinstance(module, nnx.LinearGeneral):
        if module.batch_axis:
            return f"LinearGeneral with batch_axis={dict(module.batch_axis)}"
        return "kernel", len(module.in_features)
    equation = getattr(module, "einsum_str", None)
    if not isinstance(equation, str):
        return ""
    weights = [w for w in _EINSUM_WEIGHTS if isinstance(getattr(module, w, None), nnx.Param)]
    if len(weights) != 1:
        return f"einsum layer without one Param named {' or '.join(_EINSUM_WEIGHTS)}"
    n = einsum_in_ndim(equation)
    if n is None:
        return (
            f"einsum {equation!r}: accepted are equations contracting the input's trailing axes "
            "with the kernel's leading ones, '...C,CF->...F'"
        )
    return weights[0], n


def _key(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    raise TypeError(f"unexpected key {entry!r} in an NNX state")


_ADAPTED: dict[type, type] = {}


def _adapted_class(cls: type) -> type:
    """``cls`` with a ``__call__`` that adds the running block's adapter output (made once)."""
    if cls not in _ADAPTED:

        def __call__(self, *args, **kwargs):
            y = cls.__call__(self, *args, **kwargs)
            hook = inject.active_hook()
            path = getattr(self, PATH_ATTR, None)
            if hook is None or path is None:
                return y
            x = args[0] if args else next(iter(kwargs.values()))  # the layer's input
            weight, in_ndim = _layout(self)
            bias = getattr(self, "bias", None)
            bias = bias[...] if isinstance(bias, nnx.Variable) else None
            if isinstance(self, nnx.LinearGeneral):
                axes = tuple(a % x.ndim for a in self.axis)
                if axes != tuple(range(x.ndim - len(axes), x.ndim)):
                    raise ValueError(
                        f"module {path!r}: adapters support LinearGeneral contracting the "
                        f"trailing input axes; got axis={self.axis} for input rank {x.ndim}"
                    )
            return hook(path, x, y, getattr(self, weight)[...], bias, in_ndim)

        _ADAPTED[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": __name__})
    return _ADAPTED[cls]


class NnxModel:
    """A functional view of an ``nnx.Module``: its params as a plain dict, and fresh modules
    built from such a dict whose adaptable layers apply the running adapters.

    Args:
      model: the NNX module (read once here; never modified).
      names: maps each param's path in the module (``"layers/0/attn/q_proj/kernel"``: keys
        joined by "/", an adaptable layer's weight named ``kernel``) to its name in `params`,
        e.g. to match a checkpoint's or a linen twin's layout. Must be one-to-one.
    """

    def __init__(self, model: nnx.Module, names: Callable[[str], str] | None = None):
        self.graphdef, param_state, self.rest = nnx.split(model, nnx.Param, ...)
        self.layers: dict[tuple, tuple[str, int]] = {}  # module key path -> layout
        self.skipped: dict[str, str] = {}  # module path -> why it cannot be adapted
        for key, node in nnx.iter_graph(model):
            if not isinstance(node, nnx.Module):
                continue
            layout = _layout(node)
            if isinstance(layout, tuple):
                self.layers[tuple(str(k) for k in key)] = layout
            elif layout:
                self.skipped["/".join(str(k) for k in key)] = layout
        leaves, self._treedef = jax.tree_util.tree_flatten_with_path(param_state)
        rename = names or (lambda p: p)
        self._names: list[str] = []
        self.module_names: dict[tuple, str] = {}  # module key path -> its name in `params`
        for keypath, _ in leaves:
            keys = tuple(_key(k) for k in keypath[:-1])  # the last key is the Variable's value
            module, leaf = keys[:-1], keys[-1]
            if module in self.layers and leaf == self.layers[module][0]:
                leaf = "kernel"
            name = rename("/".join(module + (leaf,)))
            self._names.append(name)
            if module in self.layers and leaf == "kernel":
                self.module_names[module] = name.rpartition("/")[0]
        if len(set(self._names)) != len(self._names):
            raise ValueError("names must map the module's param paths one-to-one")
        flat = dict(zip(self._names, (v for _, v in leaves), strict=True))
        self.params: dict = traverse_util.unflatten_dict(flat, sep="/")

    @property
    def in_ndim(self) -> dict[str, int]:
        """Per adaptable layer (its name in `params`): the input axes its kernel contracts."""
        return {self.module_names[k]: n for k, (_, n) in self.layers.items()}

    def module(self, params: Mapping) -> nnx.Module:
        """A fresh module holding ``params`` whose adaptable layers apply the adapters of the
        running `inject.adapters_applied` block (and behave as the original outside one)."""
        flat = traverse_util.flatten_dict(dict(params), sep="/")
        missing = sorted(set(self._names) - set(flat))
        if missing:
            raise ValueError(f"params lack {len(missing)} leaves of the model, e.g. {missing[:3]}")
        state = jax.tree.unflatten(self._treedef, [flat[n] for n in self._names])
        fresh = nnx.merge(self.graphdef, state, self.rest)
        for key, node in nnx.iter_graph(fresh):
            name = self.module_names.get(tuple(str(k) for k in key))
            if name is not None and isinstance(node, nnx.Module):
                node.__class__ = _adapted_class(type(node))
                setattr(node, PATH_ATTR, name)
        return fresh


NnxLossFn = Callable[[nnx.Module, Any, Array], Any]


class NnxTrainer(AromaTrainer):
    """`AromaTrainer` for an ``nnx.Module``: every method (``cfg.method``: AROMA, LoRA, ReLoRA,
    DoRA, AdaLoRA, head-only) on its ``nnx.Linear`` / ``nnx.LinearGeneral`` / einsum layers.

    Args:
      model: the NNX module; it is read, never modified (train a copy of its params).
      loss_fn: ``loss_fn(module, batch, rng) -> loss`` or ``(loss, aux)``; ``module`` is a fresh
        copy of ``model`` holding the step's params, with the adapters applied.
      cfg: the run's config; ``target_modules`` and ``train_patterns`` match the names in
        `params` (the module's attribute path, "/"-joined: ``layers/0/attn/q_proj``).
      names: renames params (see `NnxModel`), e.g. to HF's layout for the PEFT export.
      donate: donate the state's buffers to the step.

    The state, the step, `finalize`, `ranks`, the checkpoints, `set_shardings` and the exports
    are `AromaTrainer`'s, over `params` (``trainer.params``). See the module docstring.
    """

    def __init__(
        self,
        model: nnx.Module,
        loss_fn: NnxLossFn,
        cfg: AromaConfig,
        names: Callable[[str], str] | None = None,
        donate: bool = True,
    ):
        if not isinstance(model, nnx.Module):
            raise TypeError(
                f"NnxTrainer takes a flax.nnx.Module, got {type(model).__name__}; for a linen "
                "model use AromaTrainer(loss_fn, params, cfg)"
            )
        self.view = NnxModel(model, names)
        self.nnx_loss_fn = loss_fn
        for skipped in self.view.skipped:
            if any(adapters_lib.matches(p, skipped) for p in cfg.target_modules):
                raise ConfigError(
                    f"target module {skipped!r} cannot take an adapter: "
                    f"{self.view.skipped[skipped]}"
                )
        view = self.view

        def linen_style_loss(params, batch, rng):
            return loss_fn(view.module(params), batch, rng)

        super().__init__(linen_style_loss, view.params, cfg, in_ndim=view.in_ndim, donate=donate)

    @property
    def params(self) -> dict:
        """The module's params as the step sees them (pass to `init`, `rebuild_state`, ...)."""
        return self.view.params

    def init(self, params: Mapping | None = None, seed: int | None = None) -> TrainState:
        """A fresh state from ``params`` (default: the module's own, `params`)."""
        return super().init(self.view.params if params is None else params, seed)

    @contextlib.contextmanager
    def adapted(self, state: TrainState) -> Iterator[nnx.Module]:
        """Within the block, a fresh NNX module with the state's base, heads and adapters
        (evaluation, generation): ``with trainer.adapted(state) as m: logits = m(x)``."""
        with self.applied(state) as params:
            yield self.view.module(params)
