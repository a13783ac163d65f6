"""AROMA hyperparameters as one frozen, validated dataclass.

Every knob of the paper (section 3, algorithm 1, appendix H) lives here, plus the few choices the
paper leaves open (docs/DESIGN.md section 1). `AromaConfig` is hashable and static, so a jitted
train step can close over it without retracing.

Example:
    >>> from aroma_jax.core.config import AromaConfig
    >>> cfg = AromaConfig(target_modules=("query", "value"), r=1, alpha=2.0, max_steps=1000)
    >>> cfg.scale
    2.0
    >>> cfg.replace(inner_tol=0.05).inner_tol
    0.05
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

from aroma_jax.core import methods
from aroma_jax.core.checks import (
    ConfigError,
    check_int,
    check_known,
    check_number,
    check_one_of,
    fail,
)

METHODS = tuple(methods.BUILTIN)  # the built-in methods; `methods.register` adds more
RESET_MODES = ("prune", "full", "none")
SCHEDULES = ("linear", "cosine", "constant")
FOLD_MODES = ("auto", "always", "never")
BIAS_CORRECTION = ("shared", "per_module")
DECAY_MASKS = ("all", "hf")


class CapacityWarning(UserWarning):
    """An explicit ``rank_capacity`` below the number of outer steps the run can take."""


@dataclasses.dataclass(frozen=True)
class AromaConfig:
    """AROMA's knobs. Defaults follow the paper's NLU setting (appendix H, table 15).

    Attributes:
      target_modules: patterns over "/"-joined Dense paths (regex full match, or a path suffix
        such as ``"query"`` or ``"attention/output/dense"``), like PEFT's ``target_modules``.
      method: ``"aroma"`` (adaptive growth), ``"lora"`` (fixed rank ``r``, never merges) or
        ``"relora"`` (merge and reset every ``inner_max_steps``, no stopping criteria) or
        ``"head"`` (no adapter is trained: only ``train_patterns``, the head-only baseline),
        ``"dora"`` (LoRA with DoRA's magnitude and normalised direction, PEFT's ``use_dora``;
        `aroma_jax.core.methods.dora`) or ``"adalora"`` (SVD-form pairs whose rank-one triplets are
        pruned to a budget, PEFT's ``AdaLoraConfig``; `aroma_jax.core.methods.adalora`), or a
        method of one's own: a name given to `aroma_jax.core.methods.register`, or a dotted path
        ``"package.module:Attribute"`` to a `aroma_jax.core.methods.base.Method` subclass.
      r: inner rank of the trainable pair (paper: 1; AROMA_r=8 for LLaMA).
      alpha: the adapter's output is scaled by ``alpha / r``.
      inner_tol: epsilon_in of eq. 5; a module is inner-converged when the signed relative change
        of ``|a b|_F`` over one check interval falls below it.
      inner_check_every: Delta T_in, the interval between inner checks, in steps.
      inner_max_steps: T_in, the inner-loop step cap (and ReLoRA's reset period).
      outer_tol: epsilon_out of eq. 6; a module is done when ``|s a b| / |W0 + dW| < outer_tol``.
      max_steps: T, the total step cap.
      rank_capacity: merge slots per module (its frozen factors are preallocated with this many
        slots of ``r`` columns, so merges never change shapes or recompile). ``None`` (default)
        derives it from the run: the most outer steps it can take plus one slot for the final
        merge (`max_outer_steps`), so it never binds. An explicit value that can bind warns
        (`CapacityWarning`); a module that fills all but its last slot stops merging and keeps
        training its current pair, which `AromaTrainer.finalize` merges into the last slot. The
        history records it (action ``full``) and the run summary lists such modules.
      reset: optimizer-state reset at outer steps: ``"prune"`` zeroes a random ``prune_ratio`` of
        the pair's state (paper, ReLoRA), ``"full"`` re-initialises it, ``"none"`` keeps it (the
        paper's "w/o reset" ablation).
      prune_ratio: fraction of optimizer state zeroed by ``reset="prune"``.
      bias_correction: Adam's bias-correction count. ``"shared"`` (the paper's code, optax's
        ``scale_by_adam``): one global count that survives resets, so a reset pair's pruned
        second moment is divided by ``1 - b2^t`` at the *global* step t and the fresh pair moves
        faster than the nominal rate for hundreds of steps. ``"per_module"``: every leaf keeps its
        own count, restarted to 0 with its state at each reset (``prune``/``full``), so a fresh
        pair takes Adam's ordinary first steps.
      keep_first_pair: never stop a module at its first outer step (the authors' code skips
        eq. 6 there, so no module ends at rank 0).
      learning_rate: peak learning rate.
      schedule: base schedule after the initial warmup: ``linear`` decay to 0 at ``max_steps``,
        ``cosine`` or ``constant``.
      min_lr_ratio: the base schedule decays to this fraction of the peak instead of to 0 (the
        authors' cosine ends at 0.1).
      warmup_steps: initial linear warmup (paper: 100; CoLA 500).
      rewarmup_steps: linear re-warmup after every actual outer step (paper: 50; CoLA 100).
      weight_decay: AdamW decoupled weight decay on the trained parameters.
      weight_decay_mask: which trained leaves decay: ``"all"``, or ``"hf"`` like HF's AdamW
        grouping (no decay on biases, LayerNorm/RMSNorm scales or embeddings; adapter pairs and
        head kernels decay).
      max_grad_norm: clip the global gradient norm of the trained parameters to this (HF
        Trainer's default is 1.0); 0 disables clipping.
      adapter_dropout: dropout on the trainable pair's input during training, PEFT's
        ``lora_dropout`` semantics (``s * b(a(dropout(x)))``; the frozen path and evaluation see
        ``x`` unchanged; DoRA, as PEFT's, also applies ``W0`` to the dropped input for its
        magnitude term, one more pass over each adapted kernel).
      b1, b2, eps: Adam hyperparameters.
      fold: fold each merged pair into an fp32 base kernel at its merge (an exact, once-per-merge
        rank-one add) instead of applying frozen factors every step. ``"auto"`` folds fp32 kernels
        and keeps factors for lower-precision ones (a fold would round the update away). The exact
        factors are kept for export either way.
      train_patterns: non-adapter parameters to train in full (task heads, like PEFT's
        ``modules_to_save``); patterns as for ``target_modules``.
      seed: seed for adapter initialisation and resets.
      init_r, target_r, tinit, tfinal, delta_t, ipt_beta1, ipt_beta2, orth_reg_weight: AdaLoRA
        only, PEFT's ``AdaLoraConfig`` fields and defaults (``deltaT``, ``beta1`` and ``beta2``
        there): pairs start at rank ``init_r``; after ``tinit`` warmup steps the total rank
        budget falls cubically to ``target_r`` per module ``tfinal`` steps before ``max_steps``
        (PEFT's ``total_step``), re-allocated every ``delta_t`` steps by sensitivity times
        uncertainty (EMAs with ``ipt_beta1``, ``ipt_beta2``); ``orth_reg_weight`` weighs the
        orthogonality regulariser added to the loss. The adapter scale is PEFT's
        ``alpha / (init_r + 1e-5)``.
      options: a plug-in method's own settings that are not fields here, as ``(name, value)``
        pairs (its ``Method.config_class`` fields beyond these); the method reads them typed
        through ``Method.settings(cfg)``.
    """

    target_modules: tuple[str, ...] = ()
    method: str = "aroma"
    r: int = 1
    alpha: float = 2.0
    inner_tol: float = 0.1
    inner_check_every: int = 10
    inner_max_steps: int = 1000
    outer_tol: float = 5e-3
    max_steps: int = 10_000
    rank_capacity: int | None = None
    reset: str = "prune"
    prune_ratio: float = 0.999
    bias_correction: str = "shared"
    keep_first_pair: bool = False
    learning_rate: float = 5e-4
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    warmup_steps: int = 100
    rewarmup_steps: int = 50
    weight_decay: float = 0.0
    weight_decay_mask: str = "all"
    max_grad_norm: float = 0.0
    adapter_dropout: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    fold: str = "auto"
    train_patterns: tuple[str, ...] = ()
    seed: int = 0
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    ipt_beta1: float = 0.85
    ipt_beta2: float = 0.85
    orth_reg_weight: float = 0.5
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        # Lists from YAML/JSON become tuples, so the config stays hashable.
        for name in ("target_modules", "train_patterns"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
                fail(name, value, "a list of module path patterns (strings)")
            object.__setattr__(self, name, tuple(value))
        if isinstance(self.options, Mapping):
            object.__setattr__(self, "options", tuple(sorted(self.options.items())))
        self._validate()
        self._warn_binding_capacity()

    def _validate(self) -> None:
        if not self.target_modules:
            fail("target_modules", self.target_modules, "a non-empty list of module patterns")
        if not isinstance(self.method, str):
            fail("method", self.method, f"one of {methods.names()} or 'package.module:Class'")
        try:
            self.plugin  # noqa: B018 (resolves a registered name or imports a dotted path)
        except methods.UnknownMethod as e:
            raise ConfigError(f"invalid method={self.method!r}: {e}") from None
        check_one_of("reset", self.reset, RESET_MODES)
        check_one_of("schedule", self.schedule, SCHEDULES)
        check_one_of("fold", self.fold, FOLD_MODES)
        check_one_of("bias_correction", self.bias_correction, BIAS_CORRECTION)
        check_one_of("weight_decay_mask", self.weight_decay_mask, DECAY_MASKS)
        if not isinstance(self.keep_first_pair, bool):
            fail("keep_first_pair", self.keep_first_pair, "true or false")
        for name in ("r", "inner_check_every", "inner_max_steps", "max_steps"):
            check_int(name, getattr(self, name), 1)
        check_int(
            "rank_capacity",
            self.rank_capacity,
            1,
            none=True,
            accepted="an integer >= 1, or null to derive it from the run",
        )
        for name in ("min_lr_ratio", "adapter_dropout"):
            check_number(name, getattr(self, name), "a number in [0, 1)")
        for name in ("warmup_steps", "rewarmup_steps", "seed"):
            check_int(name, getattr(self, name), 0)
        for name in ("alpha", "learning_rate"):
            check_number(name, getattr(self, name), "a finite number > 0")
        for name in ("inner_tol", "outer_tol", "weight_decay", "eps", "max_grad_norm"):
            check_number(name, getattr(self, name), "a finite number >= 0")
        check_number("prune_ratio", self.prune_ratio, "a number in [0, 1]")
        for name in ("b1", "b2"):
            check_number(name, getattr(self, name), "a number in [0, 1)")
        self._validate_methods()

    def _validate_methods(self) -> None:
        # The AdaLoRA fields are checked whatever the method (a typo should not wait for a
        # method switch), their cross-field rules only under adalora, like PEFT's.
        for name in ("init_r", "delta_t"):
            check_int(name, getattr(self, name), 1)
        for name in ("target_r", "tinit", "tfinal"):
            check_int(name, getattr(self, name), 0)
        for name in ("ipt_beta1", "ipt_beta2"):
            check_number(name, getattr(self, name), "a number in (0, 1)")
        check_number("orth_reg_weight", self.orth_reg_weight, "a finite number >= 0")
        self.plugin.validate(self)  # the method's cross-field rules (AdaLoRA's, like PEFT's)

    def _warn_binding_capacity(self) -> None:
        needed = max_outer_steps(self) + 1
        if self.rank_capacity is not None and self.grows and self.rank_capacity < needed:
            warnings.warn(
                f"rank_capacity={self.rank_capacity} can bind: this run can take up to "
                f"{needed - 1} outer steps (max_steps={self.max_steps}, shortest inner loop "
                f"{shortest_inner_loop(self)} steps). A module that fills {self.rank_capacity - 1} "
                "merges stops growing and keeps training its last pair (recorded as 'full'); "
                f"set rank_capacity >= {needed} or null (derived) to never bind",
                CapacityWarning,
                stacklevel=3,
            )

    @property
    def plugin(self) -> Any:
        """The `aroma_jax.core.methods.base.Method` named by ``method`` (`methods.get`)."""
        return methods.get(self.method)

    @property
    def rank_capacity_derived(self) -> int:
        """Merge slots per module the run has: one for a method that does not grow (its final
        merge), else `rank_capacity`, derived from the run when it is ``None``."""
        if not self.grows:
            return 1
        return self.rank_capacity if self.rank_capacity is not None else max_outer_steps(self) + 1

    @property
    def scale(self) -> float:
        """The adapter scale s (``alpha / r``; the method's, `Method.scale`)."""
        return self.plugin.scale(self)

    @property
    def pair_rank(self) -> int:
        """Columns of the trainable pair: ``init_r`` for AdaLoRA, ``r`` otherwise."""
        return self.plugin.pair_rank(self)

    @property
    def grows(self) -> bool:
        """Whether outer steps (merges) happen at all."""
        return bool(self.plugin.grows)

    def replace(self, **changes: Any) -> AromaConfig:
        """A copy with some fields changed (validated; unknown names are rejected)."""
        return from_dict(
            {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **changes}
        )


_DEFAULT = {f.name: f.default for f in dataclasses.fields(AromaConfig)}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The run config's ``optimizer:`` section: AdamW on the base schedule, for every method
    (`AromaConfig` documents each field). A growing method's re-warmup and optimizer-state
    reset at outer steps are its own settings (`aroma_jax.core.methods.base.GrowingConfig`)."""

    learning_rate: float = _DEFAULT["learning_rate"]
    schedule: str = _DEFAULT["schedule"]
    min_lr_ratio: float = _DEFAULT["min_lr_ratio"]
    warmup_steps: int = _DEFAULT["warmup_steps"]
    weight_decay: float = _DEFAULT["weight_decay"]
    weight_decay_mask: str = _DEFAULT["weight_decay_mask"]
    max_grad_norm: float = _DEFAULT["max_grad_norm"]
    b1: float = _DEFAULT["b1"]
    b2: float = _DEFAULT["b2"]
    eps: float = _DEFAULT["eps"]
    bias_correction: str = _DEFAULT["bias_correction"]


def build(section: Any, optimizer: OptimizerConfig, **derived: Any) -> AromaConfig:
    """The `AromaConfig` of a method section (a ``Method.config_class`` instance) and an
    optimizer section; ``derived`` fills the section's fields left ``None`` (``target_modules``
    from the model's preset, ``train_patterns`` from the head, ``seed`` from ``train.seed``).
    Fields of a plug-in's section that `AromaConfig` lacks travel in ``options``."""
    names = set(field_names())
    values = dataclasses.asdict(optimizer)
    options = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.name not in names:
            options[f.name] = value
        elif value is None and f.name in derived:
            values[f.name] = derived[f.name]
        elif value is not None or f.name == "rank_capacity":
            values[f.name] = value
    return AromaConfig(**values, options=tuple(sorted(options.items())))


def shortest_inner_loop(cfg: AromaConfig) -> int:
    """The fewest steps an inner loop can last (`Method.shortest_inner_loop`).

    ReLoRA's last exactly ``inner_max_steps``. AROMA's last at least two check intervals, since
    the first check after a re-init compares against a zero norm and never converges (or
    ``inner_max_steps``, if that is shorter).
    """
    return cfg.plugin.shortest_inner_loop(cfg)


def max_outer_steps(cfg: AromaConfig) -> int:
    """The most outer steps a run can take (0 for LoRA)."""
    if not cfg.grows:
        return 0
    return cfg.max_steps // shortest_inner_loop(cfg)


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(AromaConfig))


def from_dict(values: Mapping[str, Any]) -> AromaConfig:
    """Builds a config from a mapping, rejecting unknown keys with the list of valid ones."""
    valid = field_names()
    message = f"unknown AROMA config key(s) {{unknown}}: valid keys are {', '.join(valid)}"
    check_known(values, valid, message)
    return AromaConfig(**dict(values))


def lora(
    target_modules: tuple[str, ...], r: int = 8, alpha: float = 16.0, **kw: Any
) -> AromaConfig:
    """A plain LoRA baseline from the same machinery: fixed rank ``r``, no growth."""
    return AromaConfig(target_modules=target_modules, method="lora", r=r, alpha=alpha, **kw)


def relora(target_modules: tuple[str, ...], reset_every: int, **kw: Any) -> AromaConfig:
    """ReLoRA: merge and reset every ``reset_every`` steps, with no stopping criteria."""
    return AromaConfig(
        target_modules=target_modules, method="relora", inner_max_steps=reset_every, **kw
    )


def aroma_without_reset(target_modules: tuple[str, ...], **kw: Any) -> AromaConfig:
    """The paper's "w/o reset" ablation (table 5): AROMA keeping the optimizer state."""
    return AromaConfig(target_modules=target_modules, reset="none", **kw)
