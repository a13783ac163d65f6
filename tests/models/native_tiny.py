"""The tiny LLaMA-family config and left-padded prompts the native-model tests start from.

Plain data (no torch, no transformers): each test file changes what it needs, e.g.
``tiny_config(model_type="mistral", sliding_window=3)``.
"""

import jax
import numpy as np

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_config(**changes) -> dict:
    """`TINY` with ``changes`` (a ``config.json``-style dict for `NativeConfig.from_dict`)."""
    return {**TINY, **changes}


def prompts() -> tuple[np.ndarray, np.ndarray]:
    """Three prompts of 7 slots: a full one, one left-padded by 3, and a one-token prompt."""
    ids = np.asarray(jax.random.randint(jax.random.key(7), (3, 7), 1, 64), np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :6] = 0  # a one-token prompt
    return ids, mask
