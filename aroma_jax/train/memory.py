"""Memory a run needs, estimated before its state is built, so a run too big is refused with a
message instead of being killed by the kernel after minutes.

The estimate has three parts:

* **state** — base params, adapters (every preallocated slot), optimizer state and controller
  state, exact: the shapes of ``trainer.init`` from `jax.eval_shape` (nothing is allocated);
* **gradients and updates** — twice the trained leaves (adapters and head);
* **activations** — what the forward pass keeps for the backward pass, per layer
  ``B*L*(C_HIDDEN*H + C_FFN*F) + C_SCORES*B*heads*L^2`` values plus embeddings and output
  logits ``B*L*(2*H + 2*V)`` (V: vocabulary for language-model heads), in the compute dtype.

The coefficients were fitted to XLA's own accounting (`compiled.memory_analysis()`: arguments +
temporaries + outputs - aliased outputs of the compiled train step, CPU backend) on tiny
RoBERTa, BART and LLaMA shapes; ``tests/train/test_memory.py`` checks the estimate against it
within [0.8, 1.25]. It is a guard against runs that cannot fit, not a profiler: real models
with F = 4H and other backends were not measured.

Example:
    >>> est = Estimate(state=4_000, trained=1_000, activations=10_000, resident=3_000)
    >>> est.device, est.needed_now
    (16000, 13000)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np

if TYPE_CHECKING:
    from aroma_jax.train.run_config import RunConfig

# Fitted by least squares to XLA's accounting of the compiled step on five tiny shapes (CPU,
# jax 0.10.2): RoBERTa 16x128, 4x255 and 64x32 (LoRA r=8), LLaMA 8x128, BART 8x96 (bbc_headline);
# estimate / XLA came out 0.896, 1.108, 1.084, 1.150, 0.912. tests/train/test_memory.py
# re-measures the first and the LLaMA one. C_HIDDEN: hidden-sized values per token and layer
# (x, q, k, v, context, norms, residuals, fused temporaries); C_FFN is fixed, not fitted (the tiny
# models have F = 2H, so the two cannot be told apart there); C_SCORES: attention scores and
# probabilities per head.
C_HIDDEN = 28
C_FFN = 3
C_SCORES = 2
GIB = 1 << 30


class InsufficientMemoryError(RuntimeError):
    """The run would not fit in memory; the message gives the numbers and what to change."""


class Estimate(NamedTuple):
    """Bytes a training run needs (see the module docstring)."""

    state: int  # base params + adapters + optimizer + controller
    trained: int  # trained leaves: gradients and updates are as large, twice
    activations: int  # kept for the backward pass, batch x length
    resident: int  # of ``state``: bytes already allocated (the loaded base params)

    @property
    def device(self) -> int:
        """Peak bytes of the compiled train step."""
        return self.state + 2 * self.trained + self.activations

    @property
    def needed_now(self) -> int:
        """Bytes still to allocate: the loaded params are already resident."""
        return self.device - self.resident


def _itemsize(dtype: Any) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8  # a threefry key: two uint32 words
    return np.dtype(dtype).itemsize


def _bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * _itemsize(x.dtype) for x in jax.tree.leaves(tree))


def model_dims(config: Any) -> dict[str, int]:
    """Hidden size, FFN size, heads, layers (encoder + decoder) and vocabulary of an HF-style
    config (BERT/RoBERTa, BART, LLaMA and the native models)."""
    get = lambda *names: next(  # noqa: E731
        (int(getattr(config, n)) for n in names if getattr(config, n, None)), 0
    )
    layers = get("num_hidden_layers") or get("encoder_layers") + get("decoder_layers")
    return {
        "hidden": get("hidden_size", "d_model"),
        "ffn": get("intermediate_size", "encoder_ffn_dim"),
        "heads": get("num_attention_heads", "encoder_attention_heads"),
        "layers": layers,
        "vocab": get("vocab_size"),
    }


def activation_bytes(
    dims: Mapping[str, int], batch: int, length: int, itemsize: int, lm_head: bool
) -> int:
    """Forward values kept for the backward pass (see the module docstring)."""
    b, n = batch, length
    per_layer = b * n * (C_HIDDEN * dims["hidden"] + C_FFN * dims["ffn"])
    per_layer += C_SCORES * b * dims["heads"] * n * n
    ends = b * n * (2 * dims["hidden"] + (2 * dims["vocab"] if lm_head else 0))
    return itemsize * (dims["layers"] * per_layer + ends)


def estimate(
    trainer: Any,
    params: Any,
    config: Any,
    batch: int,
    length: int,
    itemsize: int = 4,
    lm_head: bool = False,
) -> Estimate:
    """The `Estimate` of a run: ``trainer`` an `AromaTrainer`, ``params`` the loaded params,
    ``config`` the model config, ``length`` the longest input (decoder included)."""
    shapes = jax.eval_shape(trainer.init, params)
    trained = _bytes(shapes.adapters.pairs) + _bytes(shapes.extra)
    acts = activation_bytes(model_dims(config), batch, length, itemsize, lm_head)
    return Estimate(_bytes(shapes), trained, acts, _bytes(params))


def available() -> dict[str, int | None]:
    """Free bytes: ``host`` (MemAvailable from /proc/meminfo, else psutil) and ``device`` (the
    first device's limit minus use where the backend reports it; None on CPU, where the
    device is the host)."""
    host = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
    except OSError:
        try:
            import psutil

            host = int(psutil.virtual_memory().available)
        except ImportError:
            host = None
    device = None
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        device = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return {"host": host, "device": device}


def check(est: Estimate, batch: int, length: int, free: Mapping[str, int | None]) -> None:
    """Raises `InsufficientMemoryError` when the run does not fit (the device's free memory, or
    the host's on CPU, where the step runs in host memory)."""
    where, limit = ("device", free["device"])
    if limit is None:
        where, limit = "host", free["host"]
    if limit is None or est.needed_now <= limit:
        return
    raise InsufficientMemoryError(
        f"this run needs about {size(est.device)} of {where} memory (state {size(est.state)} "
        f"incl. params and optimizer, gradients {size(2 * est.trained)}, activations "
        f"{size(est.activations)} for (micro-)batch {batch} x length {length}); "
        f"{size(est.needed_now)} more than is loaded already, but only {size(limit)} is free. "
        "Lower train.batch_size or task.max_len (activations grow with both, attention with "
        "length squared), raise train.grad_accum (micro-batches: the same run), use "
        "model.dtype=bfloat16, or spread the run over more devices (--mesh); "
        "AROMA_MEMORY_CHECK=0 skips this check"
    )


def size(n: int) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / (1 << 20):.1f} MiB"


def enabled() -> bool:
    return os.environ.get("AROMA_MEMORY_CHECK", "1") not in ("0", "false", "no")


def check_run(cfg: RunConfig, pipe: Any, trainer: Any) -> Estimate | None:
    """Estimates a run's memory before ``trainer.init`` and refuses one that cannot fit.

    With a mesh, state is divided over the ``fsdp`` x ``tensor`` axes and activations over
    ``data`` x ``fsdp`` (per device; an approximation of the sharding rules).
    """
    if not enabled():
        return None
    arrays = pipe.train_arrays
    # activations live for one micro-batch at a time (`aroma_jax.core.accumulate`)
    batch = int(cfg.train.batch_size) // int(cfg.train.grad_accum)
    length = max(int(v.shape[1]) for v in arrays.values() if getattr(v, "ndim", 0) == 2)
    itemsize = 2 if cfg.model.dtype == "bfloat16" else 4
    config = getattr(pipe.model, "config", None)
    est = estimate(trainer, pipe.params, config, batch, length, itemsize, pipe.arch in LM_ARCHS)
    if cfg.mesh:
        from aroma_jax.core import sharding

        size = dict(sharding.parse_mesh(cfg.mesh).shape)
        model_par = size.get("fsdp", 1) * size.get("tensor", 1)
        data_par = size.get("data", 1) * size.get("fsdp", 1)
        est = Estimate(
            est.state // model_par,
            est.trained // model_par,
            est.activations // data_par,
            est.resident // model_par,
        )
    check(est, batch, length, available())
    return est


LM_ARCHS = ("llama", "bart")  # vocabulary-sized logits per token
