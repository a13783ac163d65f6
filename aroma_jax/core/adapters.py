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
import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from aroma_jax.core.config import AromaConfig, ConfigError

Array = jax.Array


class Pair(NamedTuple):
    """The trainable rank-r pair: contribution ``s * (x @ a) @ b``.

    DoRA and AdaLoRA train one more vector with it (``None`` for the other methods):
    ``magnitude`` (DoRA's ``m``, `aroma_jax.core.methods.dora`) and ``singular`` (AdaLoRA's
    ``lambda``: the contribution is ``s * (x @ (a * lambda)) @ b``,
    `aroma_jax.core.methods.adalora`).
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
    """Static facts about one target module (not part of the pytree).

    A *stacked* module (``stack > 0``) is one Dense of a layer stack run under ``nn.scan``: its
    kernel is ``(stack,) + kernel_shape`` and every adapter leaf gains the same leading axis
    (``a: (stack, in, r)``, ``merges: (stack,)``, ...). Each layer is still its own module for
    the algorithm: the controller decides per (module, layer) exactly as for unrolled layers.
    ``stack_prefix`` is the scanned module's path (e.g. ``model/layers``); layer ``i``'s *entry*
    name puts ``i`` after it (``model/layers/3/self_attn/q_proj``), the unrolled model's path.
    """

    path: str
    kernel_shape: tuple[int, ...]  # one layer's kernel
    kernel_dtype: Any
    in_ndim: int = 1  # number of leading kernel axes contracted with the input
    stack: int = 0  # layers along a leading axis (0: not stacked)
    stack_prefix: str = ""

    @property
    def lead(self) -> tuple[int, ...]:
        """The shape every per-module scalar has: ``(stack,)`` or ``()``."""
        return (self.stack,) if self.stack else ()

    @property
    def entries(self) -> tuple[str, ...]:
        """The per-layer names (the path itself when not stacked)."""
        if not self.stack:
            return (self.path,)
        rest = self.path[len(self.stack_prefix) :]
        return tuple(f"{self.stack_prefix}/{i}{rest}" for i in range(self.stack))

    def layer(self, i: int) -> ModuleSpec:
        """Layer ``i``'s spec as an unstacked module named by its entry."""
        return dataclasses.replace(self, path=self.entries[i], stack=0, stack_prefix="")

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


def _stack_of(path: str, stacked: Mapping[str, int]) -> tuple[str, int]:
    for prefix, n in stacked.items():
        if path.startswith(prefix + "/"):
            return prefix, n
    return "", 0


def find_targets(
    params: Mapping[str, Any],
    patterns: Iterable[str],
    in_ndim: Mapping[str, int] | None = None,
    stacked: Mapping[str, int] | None = None,
) -> dict[str, ModuleSpec]:
    """Specs of the Dense modules matched by ``patterns`` (see `matches`).

    ``in_ndim`` gives, per path, how many leading kernel axes a DenseGeneral contracts (default 1,
    which is right for ``nn.Dense`` and for ``DenseGeneral(axis=-1, features=...)``).
    ``stacked`` maps the path of a scanned layer stack to its length (``{"model/layers": 32}``):
    kernels under it carry a leading layer axis. Patterns match the per-layer entry names
    (``model/layers/3/self_attn/q_proj``), so one config fits the scanned and unrolled model;
    a stacked module must be targeted in all of its layers or none.
    """
    stacked = dict(stacked or {})
    kernels = dense_paths(params)
    names: dict[str, tuple[str, int]] = {}  # entry name -> (module path, layer or -1)
    specs: dict[str, ModuleSpec] = {}
    for p, k in kernels.items():
        prefix, n = _stack_of(p, stacked)
        shape = tuple(k.shape[1:] if n else k.shape)
        spec = ModuleSpec(p, shape, k.dtype, in_ndim.get(p, 1) if in_ndim else 1, n, prefix)
        if n and (k.ndim < 3 or k.shape[0] != n):
            raise ValueError(f"kernel {p!r} {tuple(k.shape)} is not stacked {n} layers deep")
        specs[p] = spec
        for i, e in enumerate(spec.entries):
            names[e] = (p, i if n else -1)
    chosen = select(names, patterns, "target_modules")
    out: dict[str, ModuleSpec] = {}
    for p in sorted({names[e][0] for e in chosen}):
        spec = specs[p]
        missing = [e for e in spec.entries if e not in chosen]
        if missing:
            raise ConfigError(
                f"target_modules select {len(spec.entries) - len(missing)} of the {spec.stack} "
                f"scanned layers of {p!r} (not {missing[:3]}...): a scanned layer stack is "
                "adapted in all of its layers or none; target them all, or unroll the layers "
                "(model.scan_layers: false)"
            )
        out[p] = spec
    return out


def entry_names(specs: Mapping[str, ModuleSpec]) -> tuple[str, ...]:
    """Every (module, layer) in the order of per-entry vectors: sorted paths, then layers."""
    return tuple(e for p in sorted(specs) for e in specs[p].entries)


def entry_specs(specs: Mapping[str, ModuleSpec]) -> dict[str, ModuleSpec]:
    """Entry name -> that layer's unstacked spec."""
    out = {}
    for p in sorted(specs):
        spec = specs[p]
        for i, e in enumerate(spec.entries):
            out[e] = spec.layer(i) if spec.stack else spec
    return out


def unstack(state: AdapterState, specs: Mapping[str, ModuleSpec]) -> AdapterState:
    """The same adapters keyed by entry name, every leaf of one layer (for export, analysis)."""
    fields = []
    for d in state:
        out = {}
        for p in sorted(specs):
            spec = specs[p]
            if not spec.stack:
                out[p] = d[p]
                continue
            for i, e in enumerate(spec.entries):
                out[e] = jax.tree.map(lambda x, i=i: x[i], d[p])
        fields.append(out)
    return AdapterState(*fields)


def restack(state: AdapterState, specs: Mapping[str, ModuleSpec]) -> AdapterState:
    """The inverse of `unstack`: entry-keyed adapters back to module-keyed, stacked leaves."""
    fields = []
    for d in state:
        out = {}
        for p in sorted(specs):
            spec = specs[p]
            if spec.stack:
                out[p] = jax.tree.map(lambda *xs: jnp.stack(xs), *[d[e] for e in spec.entries])
            else:
                out[p] = d[p]
        fields.append(out)
    return AdapterState(*fields)


def entry_id(entry: str) -> tuple[str, tuple[int, ...]]:
    """A (module, layer) entry's name, independent of how its layers are laid out.

    Every integer in the path is taken out, in order: a whole component (``layers/3/up``, the
    name of layer 3 of a stacked module and of an HF unrolled model) or a ``_<n>`` suffix
    (``layers_3/up``, flax's automatic names). Both give ``("layers/up", (3,))``, so the stacked
    and the unrolled model derive the same key for the same layer.
    """
    parts, numbers = [], []
    for c in entry.split("/"):
        m = re.fullmatch(r"(.*?)_?(\d+)", c)
        if m is None:
            parts.append(c)
            continue
        numbers.append(int(m.group(2)))
        if m.group(1):
            parts.append(m.group(1))
    return "/".join(parts), tuple(numbers)


def _entry_hash(entry: str, leaf: int) -> tuple[int, int]:
    """A stable 64-bit hash of (`entry_id`, leaf) as two uint32 words (Python's `hash` is
    salted per process)."""
    name, numbers = entry_id(entry)
    digest = hashlib.blake2b(f"{name}|{numbers}|{leaf}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def entry_uniforms(
    key: Array, specs: Mapping[str, ModuleSpec], shapes: Mapping[str, tuple[tuple[int, ...], ...]]
) -> dict[str, list[Array]]:
    """``U(0, 1)`` draws per (module, layer) entry: ``shapes[path][j]`` is one layer's shape of
    leaf ``j``; returns, per path, one ``lead + shape`` array per leaf.

    Leaf ``j`` of an entry is drawn from ``key`` folded with a hash of (`entry_id`, ``j``), so
    it depends on that entry alone: a stacked and an unrolled model draw the same numbers for
    the same layer, whatever other modules are targeted. One vmapped fold for all keys and one
    vmapped draw per distinct leaf size keep the compiled step at a few Threefry kernels (72
    inlined ones, one per module, made the outer step's compile 4x longer).
    """
    # (path, layer, leaf) ordered by leaf size, then path, leaf and layer: every size group is
    # one slice of the keys, and every (path, leaf) one slice of its group's draw.
    rows = sorted(
        (
            (p, i, j)
            for p in shapes
            for j in range(len(shapes[p]))
            for i in range(len(specs[p].entries))
        ),
        key=lambda r: (math.prod(shapes[r[0]][r[2]]), r[0], r[2], r[1]),
    )
    words = [_entry_hash(specs[p].entries[i], j) for p, i, j in rows]
    if len(set(words)) < len(words):
        same = sorted(
            {
                specs[p].entries[i]
                for (p, i, _), w in zip(rows, words, strict=True)
                if words.count(w) > 1
            }
        )
        raise ValueError(
            f"modules {same[:4]} share a layout-independent name (their paths differ only in "
            "how layer numbers are written), so they would draw the same random numbers"
        )
    fold = lambda w: jax.random.fold_in(jax.random.fold_in(key, w[0]), w[1])  # noqa: E731
    keys = jax.vmap(fold)(jnp.asarray(np.asarray(words, np.uint32).reshape(-1, 2)))
    groups: dict[int, list[int]] = {}
    for n, (p, _, j) in enumerate(rows):
        groups.setdefault(math.prod(shapes[p][j]), []).append(n)
    out: dict[str, list[Any]] = {p: [None] * len(shapes[p]) for p in shapes}
    for size, members in groups.items():
        group_keys = keys[members[0] : members[-1] + 1]
        u = jax.vmap(lambda k, size=size: jax.random.uniform(k, (size,), jnp.float32))(group_keys)
        # Materialised once: without the barrier XLA fuses the Threefry hash into each module's
        # consumer (one copy per layout group, each a large kernel to compile).
        u = jax.lax.optimization_barrier(u)
        start = 0
        while start < len(members):  # one contiguous block per (path, leaf)
            p, _, j = rows[members[start]]
            n = len(specs[p].entries)
            out[p][j] = u[start : start + n].reshape(specs[p].lead + tuple(shapes[p][j]))
            start += n
    return out


def fresh_pairs(key: Array, specs: Mapping[str, ModuleSpec], r: int) -> dict[str, Pair]:
    """New pairs for every module: ``a`` Kaiming-uniform like torch's ``nn.Linear``, ``b = 0``.

    Each (module, layer) entry's ``a`` comes from its own key (`entry_uniforms`), so a stacked
    and an unrolled model draw the same fresh pairs, whatever other modules are targeted.
    """
    paths = sorted(specs)
    u = entry_uniforms(key, specs, {p: ((specs[p].fan_in, r),) for p in paths})
    out = {}
    for p in paths:
        spec = specs[p]
        bound = 1.0 / jnp.sqrt(jnp.asarray(spec.fan_in, jnp.float32))
        a = (2.0 * u[p][0] - 1.0) * bound
        out[p] = Pair(a, jnp.zeros(spec.lead + (r, spec.fan_out), jnp.float32))
    return out


def prune_keep(
    key: Array, specs: Mapping[str, ModuleSpec], pairs: Mapping[str, Pair], ratio: float
) -> dict[str, Pair]:
    """Per pair leaf, which optimizer-state entries a ``"prune"`` reset keeps (a ``1 - ratio``
    share), drawn per (module, layer) entry like `fresh_pairs` (see `optim.reset`'s ``keep``)."""
    paths = sorted(pairs)
    shapes = {
        p: tuple(tuple(x.shape[len(specs[p].lead) :]) for x in pairs[p] if x is not None)
        for p in paths
    }
    u = entry_uniforms(key, specs, shapes)
    out = {}
    for p in paths:
        drawn = iter(x < 1.0 - ratio for x in u[p])
        out[p] = Pair(*(None if x is None else next(drawn) for x in pairs[p]))
    return out


def init(
    specs: Mapping[str, ModuleSpec],
    cfg: AromaConfig,
    key: Array,
    kernels: Mapping[str, Array] | None = None,
) -> AdapterState:
    """A fresh adapter state: new pairs, empty frozen slots, rank 0, nothing done.

    The pairs are the method's (`Method.init_pairs`); DoRA's need the 2-D base ``kernels``
    (its magnitude starts at their column norms).
    """
    k = cfg.rank_capacity_derived * cfg.pair_rank
    method = cfg.plugin
    pairs = method.init_pairs(key, specs, cfg, kernels)
    frozen, merges, done = {}, {}, {}
    for path, spec in sorted(specs.items()):
        lead = spec.lead
        frozen[path] = Frozen(
            jnp.zeros(lead + (spec.fan_in, k), jnp.float32),
            jnp.zeros(lead + (k, spec.fan_out), jnp.float32),
        )
        merges[path] = jnp.zeros(lead, jnp.int32)
        done[path] = jnp.full(lead, not method.trains_adapters)  # head-only: never trained
    return AdapterState(pairs, frozen, merges, done)


def ranks(
    state: AdapterState, cfg: AromaConfig, specs: Mapping[str, ModuleSpec] | None = None
) -> dict[str, int]:
    """Host-side rank per module (merged components times ``r``); stacked modules (which need
    ``specs``) per layer, under their entry names."""
    merges = jax.device_get(state.merges)
    out = {}
    for p, m in sorted(merges.items()):
        m = np.asarray(m)
        if m.ndim == 0:
            out[p] = int(m) * cfg.r
            continue
        if specs is None:
            raise ValueError(f"module {p!r} is stacked: pass its specs to name its layers")
        for e, mi in zip(specs[p].entries, m.reshape(-1), strict=True):
            out[e] = int(mi) * cfg.r
    return out


def adapter_param_count(state: AdapterState) -> int:
    """Trainable adapter parameters (the pairs, with DoRA's and AdaLoRA's vectors)."""
    return sum(int(x.size) for x in jax.tree.leaves(state.pairs))


def merged_delta(frozen: Frozen, spec: ModuleSpec, scale: float) -> Array:
    """The dense ``dW`` in the kernel's shape, for export only (never in the train step)."""
    dw = scale * (frozen.a @ frozen.b)
    return dw.reshape(spec.kernel_shape)
