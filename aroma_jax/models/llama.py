"""HF Flax LLaMA with the defects of transformers 4.57 fixed.

transformers 4.57's ``FlaxLlamaForCausalLM``

1. ignores ``config.rope_theta`` (the rotary base is fixed at 10000; LLaMA-3 uses 500000,
   SmolLM2 100000),
2. ignores LLaMA-3's ``rope_scaling`` (``rope_type: llama3``),
3. slices the rotary table by ``max_position_embeddings`` along the *feature* axis, which breaks
   any model whose ``2 * head_dim`` exceeds it, and
4. does not tie the output layer to the embeddings when ``tie_word_embeddings`` is set.

`FixedFlaxLlamaForCausalLM` is a drop-in subclass (``from_pretrained``, ``__call__``,
``generate``): its rotary tables follow the config, and a tied model computes its logits with
the embedding matrix (its params hold no ``lm_head``). Logits match PyTorch transformers within
1e-4 (tests/test_llama_fix.py).

The rotary fix is scoped: while a fixed model runs, a `flax.linen.intercept_methods`
interceptor answers HF's ``FlaxLlamaRotaryEmbedding.__call__`` from a table built from the
config. Nothing in transformers is modified, so HF's own classes used elsewhere in the same
process behave exactly as shipped. Inside the fixed model's ``__call__`` (and ``generate``,
which calls it) the fix is active; applying ``model.module`` directly bypasses it: wrap such
calls in `rotary_fixed`.

Example:
    >>> # model = FixedFlaxLlamaForCausalLM.from_pretrained(path, from_pt=True)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from transformers.modeling_flax_outputs import FlaxCausalLMOutput
from transformers.models.llama import modeling_flax_llama as hf

from aroma_jax.models.native.rope import inv_frequencies


def rotary_table(config, num_pos: int) -> jnp.ndarray:
    """``(num_pos, 1, 2 * head_dim)``: sin then cos, honouring rope_theta and rope_scaling."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = float(getattr(config, "rope_theta", 10000.0))
    scaling = tuple(
        (k, tuple(v) if isinstance(v, list) else v)
        for k, v in sorted((getattr(config, "rope_scaling", None) or {}).items())
    )
    return _table(theta, head_dim, scaling, num_pos)


@functools.lru_cache(maxsize=8)  # one table per distinct config, not one per layer and trace
def _table(theta: float, head_dim: int, scaling_items: tuple, num_pos: int) -> np.ndarray:
    scaling = dict(scaling_items)
    if "type" in scaling:  # the key's older name in HF configs
        scaling.setdefault("rope_type", scaling["type"])
    inv_freq = inv_frequencies(head_dim, theta, scaling, dtype=np.float64)
    freqs = np.outer(np.arange(num_pos), inv_freq).astype(np.float32)
    emb = np.concatenate((freqs, freqs), axis=-1)
    return np.concatenate((np.sin(emb)[:, None, :], np.cos(emb)[:, None, :]), -1)


def _rotary_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, hf.FlaxLlamaRotaryEmbedding):
        return next_fun(*args, **kwargs)
    names = ("key", "query", "position_ids")
    bound = dict(zip(names, args, strict=False)) | kwargs
    table = jnp.asarray(rotary_table(module.config, module.config.max_position_embeddings))
    sincos = table[bound["position_ids"]]
    sin_pos, cos_pos = jnp.split(sincos, 2, axis=-1)
    key = hf.apply_rotary_pos_emb(bound["key"], sin_pos, cos_pos)
    query = hf.apply_rotary_pos_emb(bound["query"], sin_pos, cos_pos)
    return jnp.asarray(key, dtype=module.dtype), jnp.asarray(query, dtype=module.dtype)


@contextlib.contextmanager
def rotary_fixed() -> Iterator[None]:
    """Within the block, HF Flax LLaMA rotary embeddings follow rope_theta and rope_scaling.

    >>> # with rotary_fixed(): logits = model.module.apply({"params": p}, ids).logits
    """
    with nn.intercept_methods(_rotary_interceptor):
        yield


class FixedFlaxLlamaForCausalLMModule(hf.FlaxLlamaForCausalLMModule):
    """Ties the output layer to the embeddings when the config says so."""

    def setup(self):
        self.model = hf.FlaxLlamaModule(self.config, dtype=self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Dense(
                self.config.vocab_size,
                use_bias=False,
                dtype=self.dtype,
                kernel_init=nn.initializers.normal(stddev=self.config.initializer_range),
            )

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        deterministic=True,
        init_cache=False,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
    ):
        outputs = self.model(
            input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            deterministic=deterministic,
            init_cache=init_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        hidden = outputs[0]
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(hidden.astype(self.dtype))
        else:
            logits = self.lm_head(hidden)
        if not return_dict:
            return (logits,) + outputs[1:]
        return FlaxCausalLMOutput(
            logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class FixedFlaxLlamaForCausalLM(hf.FlaxLlamaForCausalLM):
    """``FlaxLlamaForCausalLM`` with rope_theta, llama3 rope_scaling and tied embeddings."""

    module_class = FixedFlaxLlamaForCausalLMModule

    def init_weights(self, *args, **kwargs):
        # The constructor initialises the module directly, not through `__call__`: without the
        # fix a config whose 2 * head_dim exceeds max_position_embeddings fails already here.
        with rotary_fixed():
            return super().init_weights(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        with rotary_fixed():
            return super().__call__(*args, **kwargs)
