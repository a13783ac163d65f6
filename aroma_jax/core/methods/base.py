"""The protocol a PEFT method implements, with the defaults of a plain, fixed-rank LoRA pair.

`AromaTrainer` owns what every method shares (the frozen base, the pair pytree, injection into
Dense calls, the optimizer with its done masks, the preallocated merge slots, `finalize`). It asks
the config's method (``cfg.plugin``, looked up in `aroma_jax.core.methods`) everything else. Each
hook is a pure function of arrays and static settings, called inside the one compiled step (the
ones marked *host* run outside it), and a method's own state is one pytree,
``ControllerState.method_state`` (a NamedTuple or dict; its leaves per module are shaped
``lead + (...)``, ``lead`` being ``(L,)`` for a stacked module, ``()`` otherwise).

============================ ====================================================================
state                        `init_pairs`, `init_state`, `trains_adapters`, `pair_rank`, `scale`
contribution to a Dense call `forward_pair`, `column_scale`
extra loss                   `extra_loss`
after the optimizer update   `after_update`, `inner_check`, `outer_due`, `stop` (eq. 6's rule,
                             with a per-module state `outer_local`/`with_outer_locals`)
optimizer-state resets       `grows`: a growing method's merged pairs are reset at each outer
                             step by ``cfg.reset`` (`aroma_jax.core.optim.reset`)
ranks and parameter counts   `rank_vector`, `host_ranks`, `pair_params`, `total_rank_series`,
                             `shortest_inner_loop`
finish and export            `final_local`, `final_pair`, `final_nonzero`, `save_tensors`,
                             `save_meta`, `restore`, `merged_kernel`, `peft_files`
config                       `validate`
============================ ====================================================================

Subclass `Method` (or a built-in method, e.g. `aroma_jax.core.methods.aroma.Aroma`) and override
what differs; `aroma_jax.examples.custom_method` is a complete one-file example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aroma_jax.core import adapters as adapters_lib
from aroma_jax.core import controller
from aroma_jax.core.adapters import AdapterState, Frozen, ModuleSpec, Pair
from aroma_jax.core.config import AromaConfig

Array = jax.Array
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AromaConfig)}


def setting(name: str) -> Any:
    """A method config field whose default is `AromaConfig`'s field ``name`` (one default)."""
    return dataclasses.field(default=_DEFAULTS[name])


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """The run config's method section (``aroma:`` in YAML) with the settings every method has.

    Each method's ``config_class`` subclasses it with its own fields only (PEFT's per-method
    configs): LoRA has no ``outer_tol``, AdaLoRA has its budget. The run config accepts exactly
    these keys for the chosen ``method``; the optimizer's are a section of their own
    (`aroma_jax.core.config.OptimizerConfig`).

    Attributes:
      method: the method's registered name or dotted path (`aroma_jax.core.methods.get`).
      target_modules: Dense path patterns to adapt; ``None``: the architecture's preset.
      train_patterns: parameters trained in full (the task head); ``None``: by ``train.head``.
      seed: adapter initialisation and reset seed; ``None``: ``train.seed``.
      r, alpha, max_steps, adapter_dropout, fold: as `AromaConfig`'s.
    """

    method: str = setting("method")
    target_modules: tuple[str, ...] | None = None
    train_patterns: tuple[str, ...] | None = None
    seed: int | None = None
    r: int = setting("r")
    alpha: float = setting("alpha")
    max_steps: int = setting("max_steps")
    adapter_dropout: float = setting("adapter_dropout")
    fold: str = setting("fold")


@dataclasses.dataclass(frozen=True)
class GrowingConfig(MethodConfig):
    """A method that merges and re-initialises its pair at outer steps (AROMA, ReLoRA): the merge
    slots, the optimizer-state reset of a merged pair and its learning-rate re-warmup."""

    inner_max_steps: int = setting("inner_max_steps")
    rank_capacity: int | None = setting("rank_capacity")
    reset: str = setting("reset")
    prune_ratio: float = setting("prune_ratio")
    rewarmup_steps: int = setting("rewarmup_steps")


class Method:
    """A PEFT method. The defaults are LoRA's: one trainable pair per module, never merged
    before `AromaTrainer.finalize`, no extra loss, no state of its own."""

    name = "lora"
    grows = False  # outer steps (merge, re-init, optimizer-state reset) can happen
    trains_adapters = True  # False: every module is done from the start (head-only)
    # The run config's method section for this method: its fields are the keys it accepts.
    # A plug-in's own fields beyond `AromaConfig`'s reach it through `settings`.
    config_class: type = MethodConfig

    # ------------------------------------------------------------------ config
    def validate(self, cfg: AromaConfig) -> None:
        """Cross-field rules of this method's settings; raise `ConfigError` to refuse."""

    def settings(self, cfg: AromaConfig) -> Any:
        """This method's `config_class` instance with ``cfg``'s values (a plug-in's own fields
        from ``cfg.options``, else their defaults)."""
        options = dict(cfg.options)
        values = {}
        for f in dataclasses.fields(self.config_class):
            if f.name in options:
                values[f.name] = options[f.name]
            elif f.name in _DEFAULTS:
                values[f.name] = getattr(cfg, f.name)
        return self.config_class(**values)

    def pair_rank(self, cfg: AromaConfig) -> int:
        """Columns of the trainable pair (and of each merge slot)."""
        return cfg.r

    def scale(self, cfg: AromaConfig) -> float:
        """The adapter scale ``s`` of ``s * (x @ a) @ b``."""
        return cfg.alpha / cfg.r

    def shortest_inner_loop(self, cfg: AromaConfig) -> int:
        """The fewest steps between two outer steps (sizes the derived merge capacity).

        Eq. 5's loops last at least two check intervals, since the first check after a re-init
        compares against a zero norm and never converges (or ``inner_max_steps``, if shorter).
        """
        return min(2 * cfg.inner_check_every, cfg.inner_max_steps)

    # ------------------------------------------------------------------- state
    def init_pairs(
        self,
        key: Array,
        specs: Mapping[str, ModuleSpec],
        cfg: AromaConfig,
        kernels: Mapping[str, Array] | None,
    ) -> dict[str, Pair]:
        """Every module's first trainable pair (``kernels``: the 2-D base kernels)."""
        return adapters_lib.fresh_pairs(key, specs, cfg.r)

    def init_state(
        self, cfg: AromaConfig, adapters: AdapterState, kernels: Mapping[str, Array]
    ) -> Any:
        """The method's own state (``ControllerState.method_state``), or ``None``."""
        return None

    # ----------------------------------------------------------------- forward
    def forward_pair(self, pair: Pair) -> Pair:
        """The plain ``(a, b)`` the Dense call applies as ``s * (x @ a) @ b``."""
        return pair

    def column_scale(
        self, trainer: Any, state: Any, adapters: AdapterState, training: bool
    ) -> dict[str, Array] | None:
        """Per module, a factor ``(out,)`` multiplying the adapted output (DoRA), or ``None``."""
        return None

    def extra_loss(self, cfg: AromaConfig, pairs: Mapping[str, Pair]) -> Array | None:
        """A term added to the model's loss (and to the reported loss), or ``None``."""
        return None

    # ------------------------------------------------------ after the update
    def after_update(
        self,
        cfg: AromaConfig,
        method_state: Any,
        pairs: dict[str, Pair],
        grads: Mapping[str, Pair],
        step: Array,
        live: Array,
        n_entries: int,
    ) -> tuple[Any, dict[str, Pair]]:
        """Runs after every optimizer update (``step``: steps taken before this one; ``live``:
        the run is not finished). Returns the new method state and pairs."""
        return method_state, pairs

    def inner_check(
        self,
        ctrl: controller.ControllerState,
        adapters: AdapterState,
        cfg: AromaConfig,
        now: Mapping[str, Array] | None,
        live: Array,
        n_entries: int,
    ) -> tuple[controller.ControllerState, Array, Array, Array]:
        """``(ctrl, checked, rho_in, label)``: an inner-loop check when due, its ratio per entry
        (NaN where none) and its convergence label per entry (AROMA's eq. 5 ``rho_in <
        inner_tol``), which the history records as computed here; none by default."""
        no = jnp.zeros((n_entries,), bool)
        return ctrl, jnp.zeros((), bool), jnp.full((n_entries,), jnp.nan, jnp.float32), no

    def outer_due(
        self, ctrl: controller.ControllerState, adapters: AdapterState, cfg: AromaConfig
    ) -> Array:
        """The global trigger of an outer step (bool scalar); never for a method that does not
        grow."""
        return jnp.zeros((), jnp.bool_)

    def stop(
        self, cfg: AromaConfig, rho: Array, merges: Array, pair_norm: Array, local: Any
    ) -> tuple[Any, Any]:
        """At an outer step and at ``max_steps`` (`AromaTrainer.finalize`), per active module
        (one layer of a stacked one): whether eq. 6's ratio ``rho`` stops it (bool, or
        ``None``: never), given its ``merges`` so far, its pair's ``|a b|`` and its
        `outer_local` state; returns ``(stop, new local)``."""
        return None, local

    def outer_local(self, method_state: Any, path: str) -> Any:
        """Module ``path``'s part of the method state that `stop` reads and updates."""
        return None

    def with_outer_locals(self, method_state: Any, local: Mapping[str, Any]) -> Any:
        """The method state with every module's `stop` local put back."""
        return method_state

    # ------------------------------------------------------------------- ranks
    def rank_vector(
        self, cfg: AromaConfig, ctrl: controller.ControllerState, adapters: AdapterState
    ) -> Array:
        """Per entry, the rank the step reports (int32 ``(n,)``): merged components times r."""
        return controller.stack_entries(adapters.merges) * cfg.r

    def host_ranks(self, trainer: Any, state: Any) -> dict[str, int]:
        """*host*: entry name -> its rank, from a state."""
        return adapters_lib.ranks(state.adapters, trainer.cfg, trainer.specs)

    def pair_params(self, fan_in: int, fan_out: int, r: int, init_r: int | None = None) -> int:
        """*host*: trained adapter parameters of one module's pair."""
        return r * (fan_in + fan_out)

    def total_rank_series(self, recorded: np.ndarray, r: int, n_modules: int) -> np.ndarray:
        """*host*: the total-rank curve from the steps' recorded ``total_rank``."""
        return recorded

    # ------------------------------------------------------------------ finish
    def final_local(self, method_state: Any, path: str) -> Any:
        """Module ``path``'s part of the method state that `final_pair` reads."""
        return None

    def final_pair(self, pair: Pair, local: Any) -> Pair:
        """The plain pair `AromaTrainer.finalize` merges into the module's last slot."""
        return pair

    def final_nonzero(self, final: Pair, pair_norm: Array) -> Array:
        """Whether the final pair (``|a b|`` = ``pair_norm``) changes the model (a zero pair is
        not written)."""
        return pair_norm > 0

    # ------------------------------------------------------------------ export
    def save_tensors(self, trainer: Any, state: Any) -> dict[str, np.ndarray]:
        """*host*: extra tensors for ``final/adapters.safetensors`` (one entry per layer)."""
        return {}

    def save_meta(self, cfg: AromaConfig) -> dict[str, Any]:
        """*host*: extra keys for ``final/meta.json``."""
        return {}

    def restore(self, trainer: Any, tensors: Mapping[str, np.ndarray], ctrl: Any) -> Any:
        """*host*: the controller state of a rebuilt finished run, given `save_tensors`."""
        return ctrl

    def merged_kernel(
        self,
        w: np.ndarray,
        a: np.ndarray,
        b: np.ndarray,
        tensors: Mapping[str, np.ndarray],
        path: str,
        meta: Mapping[str, Any],
    ) -> np.ndarray:
        """*host*: the 2-D kernel ``w`` (fp32) with the module's whole update merged."""
        return w + meta["scale"] * (a.astype(np.float32) @ b.astype(np.float32))

    def peft_files(
        self,
        tensors: Mapping[str, np.ndarray],
        meta: Mapping[str, Any],
        torch_name: Callable[[str], str],
    ) -> tuple[dict, dict[str, np.ndarray]]:
        """*host*: ``(adapter_config fields, safetensors dict)`` in HF PEFT's format."""
        return lora_peft_files(tensors, meta, torch_name)

    # ------------------------------------------------------------- PEFT import
    def import_lora(
        self, cfg: AromaConfig, a: np.ndarray, b: np.ndarray, pair: Pair, frozen: Frozen
    ) -> tuple[Pair, Frozen, int]:
        """*host*: one module's imported PEFT LoRA factors (``a (in, k)``, already carrying
        PEFT's scale over ``cfg.scale``, and ``b (k, out)``) written into this method's state.
        Returns the module's ``(pair, frozen slots, merges)``; frozen slots returned as the
        same object are unchanged. Refused (`ImportRefused`) unless a method overrides it:
        LoRA continues training the pair (`import_as_pair`), AROMA and ReLoRA grow on top of
        it as merged factors (`import_as_merged`)."""
        raise ImportRefused(f"method {self.name!r} does not continue from a PEFT LoRA adapter")


class ImportRefused(ValueError):
    """A PEFT adapter that the run's method cannot take in; the message says why."""


def imports_lora(method: Method) -> bool:
    """Whether ``method`` overrides `Method.import_lora` (accepts a PEFT LoRA adapter)."""
    return type(method).import_lora is not Method.import_lora


def import_as_pair(
    cfg: AromaConfig, a: np.ndarray, b: np.ndarray, pair: Pair, frozen: Frozen
) -> tuple[Pair, Frozen, int]:
    """The adapter as the trainable pair (of rank ``cfg.r`` exactly), nothing merged."""
    rank = a.shape[1]
    if rank != cfg.r:
        raise ImportRefused(
            f"rank {rank}; {cfg.method} continues a pair of aroma.r={cfg.r}: set "
            f"aroma.r={rank}, or use aroma.method=aroma"
        )
    return pair._replace(a=jnp.asarray(a), b=jnp.asarray(b)), frozen, 0


def import_as_merged(
    cfg: AromaConfig, a: np.ndarray, b: np.ndarray, pair: Pair, frozen: Frozen
) -> tuple[Pair, Frozen, int]:
    """The adapter as merged factors in the first ``ceil(k / pair_rank)`` frozen slots, counted
    as merges (the rank starts at the adapter's); the pair stays fresh and grows on top."""
    rank = a.shape[1]
    merges = -(-rank // cfg.pair_rank)
    if merges >= cfg.rank_capacity_derived:
        raise ImportRefused(
            f"rank {rank}, {merges} merge slots of r={cfg.pair_rank}; the run has "
            f"{cfg.rank_capacity_derived} (rank_capacity_derived), which leaves no room to "
            f"grow: set aroma.rank_capacity above {merges}"
        )
    fa = np.zeros(frozen.a.shape, np.float32)
    fb = np.zeros(frozen.b.shape, np.float32)
    fa[:, :rank], fb[:rank, :] = a, b
    return pair, Frozen(jnp.asarray(fa), jnp.asarray(fb)), merges


def factors(tensors: Mapping[str, np.ndarray], path: str) -> tuple[np.ndarray, np.ndarray]:
    """The exact merged factors ``(A (in, k), B (k, out))`` of one saved module."""
    return tensors[f"frozen/{path}/a"], tensors[f"frozen/{path}/b"]


def lora_peft_files(
    tensors: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    torch_name: Callable[[str], str],
    magnitude: bool = False,
) -> tuple[dict, dict[str, np.ndarray]]:
    """PEFT's LoRA layout: ``lora_A.weight (k, in)``, ``lora_B.weight (out, k)`` per module
    (Flax kernels are ``(in, out)``, so transposed), ``rank_pattern``/``alpha_pattern`` so that
    PEFT's ``alpha / r`` is our scale; ``magnitude`` adds DoRA's ``lora_magnitude_vector``."""
    state: dict[str, np.ndarray] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    targets = []
    for path in meta["paths"]:
        a, b = factors(tensors, path)
        k = a.shape[1]
        if k == 0:
            continue  # rank 0: nothing to load
        name = torch_name(path)
        prefix = f"base_model.model.{name}"
        state[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.T.astype(np.float32))
        state[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.T.astype(np.float32))
        if magnitude:
            state[f"{prefix}.lora_magnitude_vector"] = np.asarray(
                tensors[f"magnitude/{path}"], np.float32
            ).reshape(-1)
        targets.append(name)
        rank_pattern[name] = k
        alpha_pattern[name] = float(meta["scale"]) * k  # PEFT scales by alpha / r
    default_r = max(rank_pattern.values(), default=meta["r"])
    config = {
        "peft_type": "LORA",
        "r": default_r,
        "lora_alpha": float(meta["scale"]) * default_r,
        "target_modules": sorted(targets),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": magnitude,
    }
    return config, state
