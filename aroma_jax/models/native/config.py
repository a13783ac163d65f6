"""`NativeConfig`: the LLaMA-family hyper-parameters, read from an HF ``config.json`` dict.

One dataclass covers LLaMA 2/3/3.1/3.2, Mistral and Qwen2/2.5; they differ only in a few switches
(projection biases, rotary scaling, sliding window, tied head). Both the transformers 4.x keys
(``rope_theta``, ``rope_scaling``, ``torch_dtype``) and the 5.x keys (``rope_parameters``,
``dtype``) are understood, so a checkpoint saved by either version loads.

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

MODEL_TYPES = ("llama", "mistral", "qwen2")
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
    raw: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def rope(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @property
    def hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict this config was read from (written back by save)."""
        return json.loads(dict(self.raw)["json"]) if self.raw else {}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NativeConfig:
        """Reads an HF ``config.json`` dict; rejects settings the native model does not run."""
        mt = d.get("model_type")
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
        theta, scaling = _rope(d)
        window = d.get("sliding_window")
        if mt == "qwen2":
            if d.get("use_sliding_window"):
                raise NativeConfigError(
                    "qwen2 with use_sliding_window=true is not supported: accepted false "
                    "(every released Qwen2/2.5 config)"
                )
            window = None
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
            o_bias=mt == "llama" and bool(d.get("attention_bias", False)),
            mlp_bias=mt == "llama" and bool(d.get("mlp_bias", False)),
            sliding_window=int(window) if window else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),  # all 3 classes' default
            pad_token_id=d.get("pad_token_id"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            initializer_range=float(d.get("initializer_range") or 0.02),
            raw=(("json", json.dumps(dict(d), sort_keys=True, default=str)),),
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
