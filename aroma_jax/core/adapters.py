"""The adapter pytree: per target module, one trainable pair and the frozen merged factors.

For a Dense kernel ``W0: (in, out)`` (DenseGeneral kernels are viewed as 2-D: contracted input
axes first, feature axes last) a module holds

* ``pair``: the trainable ``a: (in, r)`` (Kaiming-uniform) and ``b: (r, out)`` (zero);
* ``frozen``: ``A: (in, capacity*r)`` and ``B: (capacity*r, out)``, the merged pairs stacked in
  preallocated slots (unused slots are zero), so ``dW = s * A @ B`` and merges never change shapes;
* ``merges``: how many pairs were merged (the module's rank is ``merges * r``);
* ``done``: the outer criterion stopped the module; it gets no more updates.

Paths are the "/"-joined names of the Dense module in the params tree, e.g.
``bert/encoder/layer/0/attention/self/query``; they are also the module's ``linen`` path, which
is how `aroma_jax.core.inject` finds the module at call time.

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from aroma_jax import AromaConfig
    >>> from aroma_jax.core import adapters
    >>> params = nn.Dense(3, name="proj").init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> specs = adapters.find_targets({"proj": params}, ("proj",))
    >>> state = adapters.init(specs, AromaConfig(target_modules=("proj",)), jax.random.key(1))
    >>> state.pairs["proj"].a.shape, state.frozen["proj"].b.shape
    ((4, 1), (32, 3))
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from aroma_jax.core import dora
from aroma_jax.core.config import AromaConfig, ConfigError

Array = jax.Array


class Pair(NamedTuple):
    """The trainable rank-r pair: contribution ``s * (x @ a) @ b``.

    DoRA and AdaLoRA train one more vector with it (``None`` for the other methods):
    ``magnitude`` (DoRA's ``m``, `aroma_jax.core.dora`) and ``singular`` (AdaLoRA's
    ``lambda``: the contribution is ``s * (x @ (a * lambda)) @ b``, `aroma_jax.core.adalora`).
    """

    a: Array  # (in, r)
    b: Array  # (r, out)
    magnitude: Array | None = None  # DoRA: (out,)
    singular: Array | None = None  # AdaLoRA: (r,)


class Frozen(NamedTuple):
    """Merged pairs, stacked: ``dW = s * a @ b`` over all filled slots."""

    a: Array  # (in, capacity * r)
    b: Array  # (capacity * r, out)


class AdapterState(NamedTuple):
    """Every target module's adapter. Dicts are keyed by module path."""

    pairs: dict[str, Pair]
    frozen: dict[str, Frozen]
    merges: dict[str, Array]  # int32 scalars
    done: dict[str, Array]  # bool scalars


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
    """Static facts about one target module (not part of the pytree)."""

    path: str
    kernel_shape: tuple[int, ...]
    kernel_dtype: Any
    in_ndim: int = 1  # number of leading kernel axes contracted with the input

    @property
    def fan_in(self) -> int:
        return math.prod(self.kernel_shape[: self.in_ndim])

    @property
    def fan_out(self) -> int:
        return math.prod(self.kernel_shape[self.in_ndim :])

    @property
    def features(self) -> tuple[int, ...]:
        return self.kernel_shape[self.in_ndim :]


def strip_collection(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accepts either a ``params`` collection or a ``{"params": ...}`` variables dict."""
    if set(params) == {"params"} and isinstance(params["params"], Mapping):
        return params["params"]
    return params


def dense_paths(params: Mapping[str, Any]) -> dict[str, Any]:
    """Every module path holding a ``kernel`` of 2+ dims, mapped to that kernel."""
    flat = traverse_util.flatten_dict(strip_collection(params), sep="/")
    out = {}
    for key, leaf in flat.items():
        parent, _, name = key.rpartition("/")
        if name == "kernel" and getattr(leaf, "ndim", 0) >= 2:
            out[parent] = leaf
    return out


def matches(pattern: str, path: str) -> bool:
    """PEFT-like matching: the whole path, a "/"-aligned suffix, or a regex full match."""
    if path == pattern or path.endswith("/" + pattern):
        return True
    try:
        return re.fullmatch(pattern, path) is not None
    except re.error:
        return False


def select(paths: Iterable[str], patterns: Iterable[str], what: str) -> list[str]:
    """Paths matched by any pattern; a pattern matching nothing is an error listing the paths."""
    paths = sorted(paths)
    chosen: set[str] = set()
    for pattern in patterns:
        hit = [p for p in paths if matches(pattern, p)]
        if not hit:
            shown = "\n  ".join(paths[:200]) + ("\n  ..." if len(paths) > 200 else "")
            raise ConfigError(
                f"{what} pattern {pattern!r} matches no module. Patterns match a whole path, a "
                f"'/'-aligned suffix or a regex (full match). Paths that exist:\n  {shown}"
            )
        chosen.update(hit)
    return sorted(chosen)


def find_targets(
    params: Mapping[str, Any], patterns: Iterable[str], in_ndim: Mapping[str, int] | None = None
) -> dict[str, ModuleSpec]:
    """Specs of the Dense modules matched by ``patterns`` (see `matches`).

    ``in_ndim`` gives, per path, how many leading kernel axes a DenseGeneral contracts (default 1,
    which is right for ``nn.Dense`` and for ``DenseGeneral(axis=-1, features=...)``).
    """
    kernels = dense_paths(params)
    chosen = select(kernels, patterns, "target_modules")
    in_ndim = dict(in_ndim or {})
    return {
        p: ModuleSpec(p, tuple(kernels[p].shape), kernels[p].dtype, in_ndim.get(p, 1))
        for p in chosen
    }


def capacity(cfg: AromaConfig) -> int:
    """Merge slots per module (`AromaConfig.slots`): LoRA one, the others derived or set."""
    return cfg.slots


def fresh_pairs(key: Array, specs: Mapping[str, ModuleSpec], r: int) -> dict[str, Pair]:
    """New pairs for every module: ``a`` Kaiming-uniform like torch's ``nn.Linear``, ``b = 0``.

    One ``uniform`` call over all modules' ``a`` entries, sliced per module: the same
    distribution as per-module calls, but one random-number kernel in the compiled step instead
    of one per module (72 inlined Threefry kernels made the outer step's compile 4x longer).
    """
    paths = sorted(specs)
    sizes = [specs[p].fan_in * r for p in paths]
    u = jax.random.uniform(key, (max(sum(sizes), 1),), jnp.float32, -1.0, 1.0)
    out, start = {}, 0
    for p, n in zip(paths, sizes, strict=True):
        spec = specs[p]
        bound = 1.0 / jnp.sqrt(jnp.asarray(spec.fan_in, jnp.float32))
        a = (u[start : start + n] * bound).reshape(spec.fan_in, r)
        out[p] = Pair(a, jnp.zeros((r, spec.fan_out), jnp.float32))
        start += n
    return out


def init(
    specs: Mapping[str, ModuleSpec],
    cfg: AromaConfig,
    key: Array,
    kernels: Mapping[str, Array] | None = None,
) -> AdapterState:
    """A fresh adapter state: new pairs, empty frozen slots, rank 0, nothing done.

    DoRA needs the 2-D base ``kernels`` (its magnitude starts at their column norms).
    """
    k = capacity(cfg) * cfg.pair_rank
    if cfg.method == "adalora":
        from aroma_jax.core import adalora

        pairs = adalora.fresh_pairs(key, specs, cfg.pair_rank)
    else:
        pairs = fresh_pairs(key, specs, cfg.r)
    if cfg.method == "dora":
        if kernels is None:
            raise ValueError("method 'dora' needs the base kernels to initialise its magnitude")
        pairs = {
            p: pair._replace(magnitude=dora.init_magnitude(kernels[p])) for p, pair in pairs.items()
        }
    frozen, merges, done = {}, {}, {}
    for path, spec in sorted(specs.items()):
        frozen[path] = Frozen(
            jnp.zeros((spec.fan_in, k), jnp.float32), jnp.zeros((k, spec.fan_out), jnp.float32)
        )
        merges[path] = jnp.zeros((), jnp.int32)
        done[path] = jnp.asarray(cfg.method == "head")  # head-only: adapters never train
    return AdapterState(pairs, frozen, merges, done)


def ranks(state: AdapterState, cfg: AromaConfig) -> dict[str, int]:
    """Host-side rank per module (merged components times ``r``)."""
    merges = jax.device_get(state.merges)
    return {p: int(m) * cfg.r for p, m in sorted(merges.items())}


def adapter_param_count(state: AdapterState) -> int:
    """Trainable adapter parameters (the pairs, with DoRA's and AdaLoRA's vectors)."""
    return sum(int(x.size) for x in jax.tree.leaves(state.pairs))


def merged_delta(frozen: Frozen, spec: ModuleSpec, scale: float) -> Array:
    """The dense ``dW`` in the kernel's shape, for export only (never in the train step)."""
    dw = scale * (frozen.a @ frozen.b)
    return dw.reshape(spec.kernel_shape)
