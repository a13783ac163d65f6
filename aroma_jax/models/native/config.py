"""`NativeConfig`: the LLaMA-family hyper-parameters, read from an HF ``config.json`` dict.

One dataclass covers LLaMA 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3 and Gemma 3 (text); they differ
only in switches: projection biases, rotary scaling, sliding window, tied head, and for Qwen3 /
Gemma 3 the q/k norms, Gemma's ``(1 + w)`` norms around both sublayers, GeGLU, embedding scale,
query scale, per-layer sliding/global attention with its own rotary base, and final-logit
soft-capping. Both the transformers 4.x keys (``rope_theta``, ``rope_scaling``, ``torch_dtype``)
and the 5.x keys (``rope_parameters``, ``dtype``) are understood, so a checkpoint saved by either
version loads.

Example:
    >>> cfg = NativeConfig.from_dict({"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
    ...     "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4})
    >>> cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta
    (4, 4, 10000.0)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
# transformers' class defaults for keys a config.json may leave out (per model_type)
DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": {"head_dim": 128},
    "gemma3_text": {
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
    },
}
ROPE_TYPES = ("default", "linear", "llama3")


class NativeConfigError(ValueError):
    """A config the native models cannot run; the message says what is accepted."""


@dataclasses.dataclass(frozen=True)
class NativeConfig:
    """Static model hyper-parameters (hashable: safe as a linen module attribute)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted items, hashable
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    initializer_range: float = 0.02
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on queries and keys
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w), w initialised at 0
    sandwich_norm: bool = False  # Gemma: norms after attention/MLP too, pre-MLP norm renamed
    activation: str = "silu"  # or gelu_pytorch_tanh (Gemma's GeGLU)
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    query_scale: float | None = None  # attention score scale; None: head_dim ** -0.5
    final_softcap: float | None = None  # cap * tanh(logits / cap)
    # per layer, True where it attends within `sliding_window` (Gemma's layer_types);
    # () means every layer does when `sliding_window` is set (Mistral)
    sliding_layers: tuple[bool, ...] = ()
    local_rope_theta: float | None = None  # the sliding layers' rotary base (Gemma 3)
    raw: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def rope(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    def is_sliding(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` attends within `sliding_window` only."""
        if not self.sliding_window:
            return False
        return self.sliding_layers[layer] if self.sliding_layers else True

    @property
    def mixed_layers(self) -> bool:
        """Some layers slide and some attend globally (a scanned stack then decides per layer
        at run time)."""
        return len({self.is_sliding(i) for i in range(self.num_hidden_layers)}) > 1

    def rotary(self, sliding: bool) -> tuple[float, dict[str, Any]]:
        """(theta, scaling) of a sliding or a global layer: Gemma 3's local layers use their
        own base and no scaling."""
        if sliding and self.local_rope_theta is not None:
            return self.local_rope_theta, {}
        return self.rope_theta, self.rope

    @property
    def hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict this config was read from (written back by save)."""
        return json.loads(dict(self.raw)["json"]) if self.raw else {}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NativeConfig:
        """Reads an HF ``config.json`` dict; rejects settings the native model does not run."""
        mt = d.get("model_type")
        if mt == "gemma3" and isinstance(d.get("text_config"), Mapping):
            raise NativeConfigError(
                "model_type 'gemma3' is the multimodal Gemma 3: accepted its text config "
                "(model_type 'gemma3_text', Gemma3ForCausalLM checkpoints such as gemma-3-1b)"
            )
        if mt not in MODEL_TYPES:
            raise NativeConfigError(
                f"model_type {mt!r} has no native implementation: accepted {MODEL_TYPES} "
                "(use model.impl=hf for other architectures)"
            )
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if d.get(k) is None
        ]
        if missing:
            raise NativeConfigError(f"config.json lacks {missing} (model_type {mt!r})")
        original = dict(d)
        d = {**DEFAULTS.get(mt, {}), **{k: v for k, v in d.items() if v is not None}}
        heads = int(d["num_attention_heads"])
        kv = int(d.get("num_key_value_heads") or heads)
        if heads % kv:
            raise NativeConfigError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}"
            )
        head_dim = int(d.get("head_dim") or d["hidden_size"] // heads)
        if float(d.get("attention_dropout") or 0.0) > 0:
            raise NativeConfigError(
                f"attention_dropout={d['attention_dropout']} is not supported: accepted 0.0"
            )
        gemma = mt == "gemma3_text"
        theta, scaling = _rope(_gemma_rope(d, "full_attention") if gemma else d)
        window = d.get("sliding_window")
        if mt in ("qwen2", "qwen3"):
            if d.get("use_sliding_window"):
                raise NativeConfigError(
                    f"{mt} with use_sliding_window=true is not supported: accepted false "
                    "(every released Qwen2/2.5/3 config)"
                )
            window = None
        act = d.get("hidden_activation" if gemma else "hidden_act") or "silu"
        if act not in ACTIVATIONS:
            raise NativeConfigError(f"activation {act!r} is not supported: accepted {ACTIVATIONS}")
        if d.get("use_bidirectional_attention"):
            raise NativeConfigError(
                "use_bidirectional_attention=true is not supported: accepted false (causal LM)"
            )
        gemma_kw: dict[str, Any] = {}
        if gemma and d.get("attn_logit_softcapping") is not None:
            # transformers' Gemma 3 stores it but never applies it (only Gemma 2 does): a
            # model that capped here would disagree with the checkpoint's reference.
            raise NativeConfigError(
                f"attn_logit_softcapping={d['attn_logit_softcapping']} is not supported for "
                "gemma3_text: accepted null (every released Gemma 3; transformers' Gemma 3 "
                "ignores the setting)"
            )
        if gemma:
            local_theta, local_scaling = _rope(_gemma_rope(d, "sliding_attention"))
            if local_scaling:
                raise NativeConfigError(
                    f"rope scaling {local_scaling} on sliding layers is not supported: "
                    "accepted the default rope there (every released Gemma 3)"
                )
            gemma_kw = dict(
                norm_plus_one=True,
                sandwich_norm=True,
                embed_scale=True,
                query_scale=float(d["query_pre_attn_scalar"]) ** -0.5,
                final_softcap=_float_or_none(d.get("final_logit_softcapping")),
                sliding_layers=_gemma_layer_types(d),
                local_rope_theta=local_theta,
            )
        if mt == "llama":
            window = None
        eos = d.get("eos_token_id")
        return cls(
            model_type=mt,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
            rms_norm_eps=float(d.get("rms_norm_eps") or 1e-6),
            rope_theta=theta,
            rope_scaling=tuple(sorted(scaling.items())),
            qkv_bias=mt == "qwen2" or bool(d.get("attention_bias", False)),
            o_bias=mt in ("llama", "qwen3", "gemma3_text") and bool(d.get("attention_bias", False)),
            mlp_bias=mt == "llama" and bool(d.get("mlp_bias", False)),
            sliding_window=int(window) if window else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),  # DEFAULTS: Gemma's
            pad_token_id=d.get("pad_token_id"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            initializer_range=float(d.get("initializer_range") or 0.02),
            qk_norm=mt in ("qwen3", "gemma3_text"),
            activation=act,
            **gemma_kw,
            raw=(("json", json.dumps(original, sort_keys=True, default=str)),),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> NativeConfig:
        """``config.json`` (or a directory holding it)."""
        return cls.from_dict(read_config_json(path))

    def replace(self, **kw) -> NativeConfig:
        return dataclasses.replace(self, **kw)


def _rope(d: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling dict without the theta) from 4.x or 5.x keys."""
    params = dict(d.get("rope_parameters") or {})  # transformers 5.x
    legacy = dict(d.get("rope_scaling") or {})  # transformers 4.x
    theta = float(params.pop("rope_theta", d.get("rope_theta") or 10000.0))
    scaling = {**legacy, **params}
    kind = scaling.pop("rope_type", scaling.pop("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        raise NativeConfigError(f"rope type {kind!r} is not supported: accepted {ROPE_TYPES}")
    if kind == "default":
        return theta, {}
    if "factor" not in scaling:
        raise NativeConfigError(f"rope type {kind!r} needs a 'factor' (got {scaling})")
    scaling["rope_type"] = kind
    keep = (
        "rope_type",
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    )
    return theta, {k: v for k, v in scaling.items() if k in keep}


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The dict in ``config.json`` (``path`` the file or a directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no config.json at {str(path)!r}")
    return json.loads(path.read_text())


def _float_or_none(v: Any) -> float | None:
    return None if v is None else float(v)


def _gemma_rope(d: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """A LLaMA-style rope dict for Gemma 3's ``full_attention`` or ``sliding_attention``
    layers: transformers 5.x nests ``rope_parameters`` per layer type; 4.x has ``rope_theta``
    and ``rope_scaling`` (global) and ``rope_local_base_freq`` (sliding)."""
    params = d.get("rope_parameters")
    if isinstance(params, Mapping) and kind in params:
        return {"rope_parameters": dict(params[kind] or {})}
    if kind == "sliding_attention":
        return {"rope_theta": d["rope_local_base_freq"]}
    return {"rope_theta": d["rope_theta"], "rope_scaling": d.get("rope_scaling")}


def _gemma_layer_types(d: Mapping[str, Any]) -> tuple[bool, ...]:
    """Per layer, whether it slides: ``layer_types`` or, without it, every
    ``sliding_window_pattern``-th layer global (transformers' rule)."""
    n = int(d["num_hidden_layers"])
    types = d.get("layer_types")
    if types is None:
        pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
        return tuple(bool((i + 1) % pattern) for i in range(n))
    accepted = ("sliding_attention", "full_attention")
    if len(types) != n or any(t not in accepted for t in types):
        raise NativeConfigError(f"layer_types {types}: accepted {n} entries of {accepted}")
    return tuple(t == "sliding_attention" for t in types)
