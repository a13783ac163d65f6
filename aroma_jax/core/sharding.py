"""Sharded AROMA training on a `jax.sharding.Mesh`: rules, adapter/optimizer inheritance, batches.

One SPMD program: every device runs the same controller on the same (replicated) decisions, so
merges, re-inits and resets cannot drift apart across replicas (the authors' multi-GPU code
merges on rank 0 only).

* Mesh axes: ``data`` (batch), ``fsdp`` (batch, and one kernel axis of every weight), ``tensor``
  (attention heads / FFN width). `parse_mesh("data=2,fsdp=2,tensor=2")`.
* Base weights follow `Rule`s (regex over "/"-joined param paths -> one mesh axis name or None
  per kernel axis): column-parallel kernels (q, k, v, up, gate, fc1, intermediate) shard
  ``(fsdp, tensor)``, row-parallel ones (o, down, fc2, attention output, output) ``(tensor,
  fsdp)``; an axis is only sharded when its size divides evenly, else it is replicated.
* Adapters inherit their kernel's sharding, as in qwix: ``a: (in, r)`` takes the kernel's input
  axis, ``b: (r, out)`` its output axis, the rank axis is replicated; frozen factors likewise.
* The optimizer state's param-shaped parts take their params' shardings; the controller state,
  step counters and PRNG keys are replicated.

Example:
    >>> # mesh = parse_mesh("fsdp=4,tensor=2")
    >>> # state = shard_trainer(trainer, state, mesh, rules_for("llama"))
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aroma_jax.core.adapters import AdapterState, Frozen, Pair
from aroma_jax.core.train_step import AromaTrainer, TrainState

AXES = ("data", "fsdp", "tensor")


class MeshError(ValueError):
    """A bad mesh spec; the message says what is accepted."""


def parse_mesh(spec: str | Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """``"data=2,fsdp=2,tensor=2"`` -> a Mesh over all devices (product = device count)."""
    devices = list(devices if devices is not None else jax.devices())
    if isinstance(spec, str):
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, value = part.partition("=")
            if name not in AXES or not value.isdigit() or int(value) < 1:
                raise MeshError(
                    f"invalid mesh axis {part!r} in {spec!r}: accepted "
                    f"name=size with name in {AXES}, e.g. data=2,fsdp=2,tensor=2"
                )
            if name in sizes:
                raise MeshError(f"mesh axis {name!r} given twice in {spec!r}")
            sizes[name] = int(value)
    else:
        sizes = dict(spec)
    if not sizes:
        raise MeshError(f"empty mesh spec {spec!r}: accepted e.g. data=2,fsdp=2,tensor=2")
    total = math.prod(sizes.values())
    if total != len(devices):
        raise MeshError(
            f"mesh {spec!r} has {total} devices (product of axis sizes) but "
            f"{len(devices)} are present: the product must equal the device count"
        )
    names = tuple(a for a in AXES if a in sizes)
    grid = np.asarray(devices).reshape(tuple(sizes[a] for a in names))
    return Mesh(grid, names)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Params whose path matches ``pattern`` (regex search) get ``axes`` (one per array axis)."""

    pattern: str
    axes: tuple[str | None, ...]


COLUMN = r"(query|key|value|q_proj|k_proj|v_proj|up_proj|gate_proj|fc1|intermediate/dense)"
ROW = r"(o_proj|down_proj|fc2|out_proj|attention/output/dense|layer/\d+/output/dense)"
DEFAULT_RULES = (
    Rule(COLUMN + r"/kernel$", ("fsdp", "tensor")),
    Rule(ROW + r"/kernel$", ("tensor", "fsdp")),
    Rule(r"(embed_tokens|word_embeddings|shared)/embedding$", ("tensor", "fsdp")),
    Rule(r"lm_head/kernel$", ("fsdp", "tensor")),
    Rule(r"kernel$", ("fsdp", None)),
)


def rules_for(arch: str | None = None) -> tuple[Rule, ...]:
    """The rules for an architecture (bert, roberta, bart, llama share the naming above)."""
    return DEFAULT_RULES


def _fit(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh: Mesh) -> P:
    """Drops mesh axes that are absent or do not divide the array axis evenly."""
    if len(axes) != len(shape):
        axes = (axes + (None,) * len(shape))[: len(shape)]
    out = []
    for dim, ax in zip(shape, axes, strict=True):
        ok = (
            ax is not None and ax in mesh.shape and mesh.shape[ax] > 1 and dim % mesh.shape[ax] == 0
        )
        out.append(ax if ok else None)
    return P(*out)


def leaf_spec(
    path: str,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[Rule],
    stacked: Mapping[str, int] | None = None,
) -> P:
    """The PartitionSpec of one param leaf ("/"-joined ``path``, ``shape``): the first rule whose
    pattern it matches, fitted to ``mesh`` (`_fit`); replicated if none matches.

    A leaf under a ``stacked`` prefix (layers under ``nn.scan``) has a leading layer axis: it
    is replicated and the rule applies to the rest, as to one unrolled layer's leaf.
    """
    shape = tuple(shape)
    lead = any(path.startswith(prefix + "/") for prefix in (stacked or {}))
    for rule in rules:
        if re.search(rule.pattern, path):
            if lead and len(rule.axes) == len(shape):  # a rule written for the stacked leaf
                return _fit(shape, rule.axes, mesh)
            spec = _fit(shape[1:] if lead else shape, rule.axes, mesh)
            return P(None, *spec) if lead else spec
    return P()


def param_specs(
    params: Mapping, mesh: Mesh, rules: Sequence[Rule], stacked: Mapping[str, int] | None = None
) -> dict:
    """A PartitionSpec per param leaf (nested like ``params``), by `leaf_spec`."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    specs = {path: leaf_spec(path, leaf.shape, mesh, rules, stacked) for path, leaf in flat.items()}
    return traverse_util.unflatten_dict(specs, sep="/") if specs else {}


def sharding_for(
    mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES, stacked: Mapping[str, int] | None = None
) -> Callable[[str, tuple[int, ...]], NamedSharding]:
    """``(path, shape) -> NamedSharding`` by `leaf_spec`, for loaders that place each leaf as
    they read it (``sharding_for`` of `aroma_jax.models.native.checkpoint_io.load_params`): on
    several processes each one then reads only its own devices' slices of the weights."""
    return lambda path, shape: NamedSharding(mesh, leaf_spec(path, shape, mesh, rules, stacked))


def _get(tree: Mapping, path: str) -> Any:
    for k in path.split("/"):
        tree = tree[k]
    return tree


def adapter_specs(trainer: AromaTrainer, base_specs: Mapping, mesh: Mesh) -> dict[str, tuple]:
    """(in-axis spec, out-axis spec) per adapted module, from its kernel's spec."""
    out = {}
    for p, spec in trainer.specs.items():
        kspec = tuple(_get(base_specs, p + "/kernel"))[len(spec.lead) :]
        kspec = kspec + (None,) * (len(spec.kernel_shape) - len(kspec))
        if spec.in_ndim == 1 and len(spec.kernel_shape) == 2:
            out[p] = (kspec[0], kspec[1])
        else:  # DenseGeneral views: keep the adapters replicated
            out[p] = (None, None)
    return out


def state_shardings(
    trainer: AromaTrainer, state: TrainState, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES
) -> TrainState:
    """A `TrainState` of `NamedSharding`s for ``state`` on ``mesh``."""
    ns = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    stacked = getattr(trainer, "stacked", {})
    base_specs = param_specs(state.base, mesh, rules, stacked)
    extra_specs = param_specs(state.extra, mesh, rules, stacked)
    io = adapter_specs(trainer, base_specs, mesh)
    live = state.adapters.pairs
    paths = trainer.module_paths
    # A stacked module's leaves lead with the (replicated) layer axis.
    lead = {p: (None,) * len(trainer.specs[p].lead) for p in paths}
    pairs = {  # DoRA's magnitude (out,) follows b's output axis; AdaLoRA's lambda is replicated
        p: Pair(
            P(*lead[p], io[p][0], None),
            P(*lead[p], None, io[p][1]),
            magnitude=None if live[p].magnitude is None else P(*lead[p], io[p][1]),
            singular=None if live[p].singular is None else P(),
        )
        for p in paths
    }
    frozen = {p: Frozen(P(*lead[p], io[p][0], None), P(*lead[p], None, io[p][1])) for p in paths}
    adapters = AdapterState(pairs, frozen, {p: P() for p in paths}, {p: P() for p in paths})
    trainable_specs = {"pairs": pairs, "extra": extra_specs}
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    opt_specs = optax.tree_utils.tree_map_params(
        trainer.tx.update.inner,  # the wrapped inner optimizer: finds param-shaped state
        lambda _, spec: spec,
        state.opt_state.inner,
        trainable_specs,
        transform_non_params=lambda _: P(),
        is_leaf=is_spec,
    )
    opt = state.opt_state._replace(inner=opt_specs, count=P(), last_outer=P())
    ctrl = jax.tree.map(lambda _: P(), state.ctrl)
    specs = TrainState(base_specs, extra_specs, adapters, opt, ctrl, P())
    return jax.tree.map(ns, specs, is_leaf=is_spec)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over every data-parallel axis present (data, fsdp)."""
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape and mesh.shape[a] > 1)
    return NamedSharding(mesh, P(axes if axes else None))


def shard_trainer(
    trainer: AromaTrainer, state: TrainState, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES
) -> TrainState:
    """Places ``state`` on ``mesh`` and recompiles ``trainer``'s step for those shardings."""
    shardings = state_shardings(trainer, state, mesh, rules)
    state = put_global(state, shardings)
    trainer.set_shardings(shardings, batch_sharding(mesh))
    return state


DISTRIBUTED_ENV = (
    "AROMA_COORDINATOR",
    "AROMA_NUM_PROCESSES",
    "AROMA_PROCESS_ID",
    "AROMA_DISTRIBUTED",
    "AROMA_HEARTBEAT_TIMEOUT",
)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if not value.strip().isdigit():
        raise ValueError(f"{name}={value!r} is not a whole number: accepted e.g. {name}=2")
    return int(value)


def put_global(tree: Any, shardings: Any) -> Any:
    """`jax.device_put` that also places onto devices of other processes.

    With several processes, every process holds the same full value (same seed, same
    checkpoint) and contributes the shards of its own devices; `jax.device_put` refuses
    shardings that span other processes' devices.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x: Any, where: NamedSharding) -> Any:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(x))
            where = NamedSharding(where.mesh, P(*where.spec, *[None] * (data.ndim - x.ndim)))
            placed = jax.make_array_from_callback(data.shape, where, lambda i: data[i])
            return jax.random.wrap_key_data(placed, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, where, lambda i: host[i])

    return jax.tree.map(one, tree, shardings)


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_s: int | None = None,
) -> bool:
    """Starts multi-process JAX from arguments or ``AROMA_COORDINATOR`` / ``AROMA_NUM_PROCESSES``
    / ``AROMA_PROCESS_ID``; on TPU pods and SLURM, JAX discovers these itself when
    ``AROMA_DISTRIBUTED=1``. Returns whether this is a distributed run (False: single process).

    Must run before anything touches devices (`jax.devices()`, any array); a second call is a
    no-op. A process that stops sending heartbeats for ``heartbeat_timeout_s`` (argument,
    ``AROMA_HEARTBEAT_TIMEOUT``, default 60 s) makes every other process abort with JAX's
    "another task died" message instead of waiting forever in a collective. On CPU the
    cross-process collectives use gloo.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get("AROMA_COORDINATOR") or None
    num_processes = num_processes if num_processes is not None else _env_int("AROMA_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("AROMA_PROCESS_ID")
    heartbeat = heartbeat_timeout_s or _env_int("AROMA_HEARTBEAT_TIMEOUT") or 60
    auto = os.environ.get("AROMA_DISTRIBUTED") == "1"
    if not (coordinator or num_processes or auto):
        return False
    if not auto and not (coordinator and num_processes and process_id is not None):
        raise ValueError(
            "a multi-process run needs all of the coordinator address, the number of processes "
            f"and this process's id (got coordinator={coordinator!r}, num_processes="
            f"{num_processes}, process_id={process_id}): accepted AROMA_COORDINATOR=host:port "
            "AROMA_NUM_PROCESSES=N AROMA_PROCESS_ID=i (or --coordinator/--num-processes/"
            "--process-id), or AROMA_DISTRIBUTED=1 where JAX detects them (TPU pods, SLURM)"
        )
    if process_id is not None and num_processes and not 0 <= process_id < num_processes:
        raise ValueError(
            f"process id {process_id} is out of range for {num_processes} processes: "
            f"accepted 0..{num_processes - 1}"
        )
    # Without it XLA:CPU has no cross-process collectives; GPU and TPU clients ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat,
    )
    return True


def is_writer() -> bool:
    """Whether this process writes the run's files (metrics, TensorBoard, plots, summary,
    exports, the run-directory lock): process 0 only. Checkpoints are written by every process
    together (orbax), not by the writer alone."""
    return jax.process_index() == 0


def barrier(name: str, timeout_s: int = 600) -> None:
    """Waits until every process reaches ``name``; raises a clear error after ``timeout_s``
    (a process stuck or dead) instead of hanging. A no-op for one process."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client has the only barrier with a timeout

    try:
        distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)
    except Exception as err:  # the client raises XlaRuntimeError (DEADLINE_EXCEEDED and others)
        raise RuntimeError(
            f"process {jax.process_index()} of {jax.process_count()} waited {timeout_s} s at "
            f"{name!r} for the other processes: one of them died or is stuck ({err})"
        ) from err


def process_rows(sharding: NamedSharding, global_rows: int) -> slice:
    """The contiguous rows of a global batch whose shards live on this process's devices.

    Every process feeds exactly these rows (`make_global_batch`), so no process loads the
    whole batch.
    """
    index = sharding.addressable_devices_indices_map((global_rows,))
    spans = sorted({s[0].indices(global_rows)[:2] for s in index.values()})
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:], strict=False)):
        raise MeshError(
            f"this process's batch rows {spans} are not contiguous: lay the mesh out so that "
            "each process's devices are adjacent along the batch axes (jax.devices() order)"
        )
    return slice(spans[0][0], spans[-1][1])


def make_global_batch(
    local_batch: Mapping[str, np.ndarray], sharding: NamedSharding, global_rows: int
) -> dict:
    """This process's rows (``process_rows``) of each field -> global sharded arrays."""
    return {
        k: jax.make_array_from_process_local_data(
            sharding, np.asarray(v), (global_rows, *np.shape(v)[1:])
        )
        for k, v in local_batch.items()
    }


def to_host(tree: Any) -> Any:
    """``tree`` with every array as a full numpy array on every process.

    Arrays sharded across processes are gathered (a collective: every process must call this
    with the same tree); replicated and single-process arrays are read locally.
    """
    from jax.experimental import multihost_utils

    def one(x: Any) -> Any:
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return jax.device_get(x)
        if x.is_fully_replicated:  # typed PRNG keys stay keys (on a local device)
            local = x.addressable_data(0)
            is_key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            return local if is_key else np.asarray(local)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)
