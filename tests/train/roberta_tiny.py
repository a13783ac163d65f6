"""The tiny RoBERTa classifier the export tests train, on the native encoder (``impl="native"``,
transformers 5.x) or on transformers' Flax class (``impl="hf"``, 4.x: tests marked ``hf4``)."""

from pathlib import Path

import pytest

IMPLS = ["native", pytest.param("hf", marks=pytest.mark.hf4)]

CONFIG = dict(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=64,
    num_labels=3,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def tiny_roberta(impl: str):
    """(transformers ``RobertaConfig``, model with ``.params`` and the HF Flax call signature)."""
    import transformers

    cfg = transformers.RobertaConfig(**CONFIG)
    if impl == "hf":
        return cfg, transformers.FlaxRobertaForSequenceClassification(cfg, seed=0)
    from aroma_jax.models.native.bert import EncoderConfig
    from aroma_jax.models.native.encoder_model import NativeEncoder

    return cfg, NativeEncoder(EncoderConfig.from_dict(cfg.to_dict()), seed=0)


def save_base(model, params, out: Path) -> None:
    """A PyTorch-loadable checkpoint of ``params`` in ``out``, as `aroma-jax export` writes it:
    native models write PyTorch layout themselves; HF Flax ones convert through torch."""
    from aroma_jax.train.export import save_pytorch_weights

    if save_pytorch_weights(model, params, out) is None:
        model.save_pretrained(out, params=params)
