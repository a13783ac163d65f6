"""`NativeCausalLM`: the native LLaMA-family model behind the HF Flax calling convention.

The rest of the package (objectives, pipeline, bench, export) talks to models as HF Flax
models: ``model(input_ids, attention_mask=..., params=..., train=...).logits``,
``model.generate(...).sequences``, ``model.config``, ``model.params``,
``model.save_pretrained(dir, params=...)``. This class gives the native linen `CausalLM` that
interface, so ``model.impl: native`` changes nothing else.

* `from_pretrained` reads ``config.json`` and safetensors (sharded or not; lazily, leaf by leaf,
  cast to ``param_dtype``) from a local directory or a hub name (through ``huggingface_hub``);
  an HF Flax ``flax_model.msgpack`` (e.g. the converted SmolLM2 asset) also loads, since the
  param trees agree. No torch and no transformers model class is involved.
* `save_pretrained` writes ``config.json`` and ``model.safetensors`` in PyTorch layout, which
  PyTorch transformers (4.x and 5.x) loads with ``from_pretrained``.
* ``scan_layers=True`` runs the layers under ``nn.scan`` with the params in the stacked layout
  (`aroma_jax.models.native.modeling.stack_layers`); `from_pretrained` loads straight into it
  and `save_pretrained` writes per-layer HF names from it.
* `generate` is greedy decoding or sampling (temperature, top-k, top-p: `sampling`) over a
  fixed-size buffer, honouring left padding through position ids: the prompt runs once into a
  KV cache, then one compiled loop runs a single-token forward pass per new token
  (``use_cache=False`` re-runs the buffer instead).

Example:
    >>> from aroma_jax.models.native.config import NativeConfig
    >>> cfg = NativeConfig.from_dict({"model_type": "qwen2", "vocab_size": 32, "hidden_size": 16,
    ...     "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
    ...     "num_key_value_heads": 2})
    >>> m = NativeCausalLM(cfg, seed=0)
    >>> import numpy as np
    >>> m(np.zeros((1, 4), np.int32)).logits.shape
    (1, 4, 32)
    >>> m.generate(np.ones((1, 3), np.int32), max_new_tokens=2).sequences.shape
    (1, 5)
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp

from aroma_jax.models.native import checkpoint_io, sampling
from aroma_jax.models.native.config import NativeConfig
from aroma_jax.models.native.modeling import LAYERS_PATH, CausalLM, init_cache, stack_layers
from aroma_jax.models.native.wrapper import (
    GenerateOutput,
    LogitsOutput,
    NativeWrapper,
    first_set,
    has_safetensors,
    resolve,
)


class NativeCausalLM(NativeWrapper):
    """A `CausalLM` module with its config, params and the HF Flax calling convention
    (`NativeWrapper`: the scanned layout, params, saving).

    No dropout: every LLaMA-family config has attention_dropout 0, and others are rejected.
    """

    module_class = CausalLM
    has_dropout = False

    @property
    def layer_stacks(self) -> tuple[tuple[tuple[str, ...], int], ...]:
        return ((LAYERS_PATH, self.config.num_hidden_layers),)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        params=None,
        train: bool = False,
        dropout_rng=None,
        **unused,
    ) -> LogitsOutput:
        """Logits; ``train`` and ``dropout_rng`` are accepted for HF compatibility."""
        del unused
        mask = None if attention_mask is None else jnp.asarray(attention_mask)
        return self._apply(params, [jnp.asarray(input_ids), mask, position_ids], train, dropout_rng)

    def generate(
        self,
        input_ids,
        attention_mask=None,
        params=None,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        pad_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        use_cache: bool = True,
        do_sample: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        prng_key: Any = None,
        **unused,
    ) -> GenerateOutput:
        """Greedy or sampled continuation of (left-padded) prompts; finished rows get
        ``pad_token_id``.

        With ``use_cache`` (the default) the prompt runs once and fills a KV cache of
        ``prompt + max_new_tokens`` slots, then each new token is one single-token forward pass
        (`modeling.KVCache`); ``use_cache=False`` re-runs the whole buffer for every token (the
        reference the cache is tested against).

        ``do_sample=True`` draws each token from the logits filtered by ``temperature``,
        ``top_k`` and ``top_p`` (HF's warpers and defaults: 1, 50, 1; `sampling`), with
        ``prng_key`` (HF Flax's keyword; default ``PRNGKey(0)``) folded with the token's index,
        so the same key gives the same tokens with and without the cache. Beam search
        (``num_beams > 1``) is rejected.
        """
        sample = sampling.from_generate_kwargs(
            do_sample, temperature, top_k, top_p, unused.get("num_beams")
        )
        params = self.params if params is None else params
        ids = jnp.asarray(input_ids)
        b, length = ids.shape
        if max_new_tokens is None:
            if max_length is None:
                raise ValueError("generate needs max_new_tokens or max_length")
            max_new_tokens = max_length - length
        n = int(max_new_tokens)
        if n <= 0:
            return GenerateOutput(ids)
        pad = int(first_set(pad_token_id, self.config.pad_token_id, 0))
        eos = tuple(int(e) for e in _ids(first_set(eos_token_id, self.config.eos_token_id, -1)))
        mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask)
        # One compiled program per (settings, shapes): called eagerly, the prefill would
        # otherwise run op by op; inside a caller's jit this is an inlined call.
        settings = (n, pad, eos, bool(use_cache), sample)
        fn = self._generate_fns.get(settings)
        if fn is None:
            fn = jax.jit(
                functools.partial(
                    self._decode, n=n, pad=pad, eos=eos, use_cache=bool(use_cache), sample=sample
                )
            )
            self._generate_fns[settings] = fn
        return GenerateOutput(fn(params, ids, mask, sampling.as_key(prng_key)))

    def _decode(
        self,
        params,
        ids,
        mask,
        key,
        *,
        n: int,
        pad: int,
        eos: tuple,
        use_cache: bool,
        sample: sampling.Sampling | None,
    ):
        """`generate`'s body: ``ids``/``mask`` are the (left-padded) prompts."""
        b, length = ids.shape
        eos = jnp.asarray(eos)
        ids = jnp.concatenate([ids, jnp.full((b, n), pad, ids.dtype)], axis=1)
        mask = jnp.concatenate([mask.astype(jnp.int32), jnp.zeros((b, n), jnp.int32)], axis=1)

        def emit(t, ids, mask, done, last):
            """Writes the token chosen from ``last`` (the logits before slot ``length + t``)
            there."""
            cur = length + t
            chosen = sampling.choose(last, sample, jax.random.fold_in(key, t))
            nxt = jnp.where(done, pad, chosen).astype(ids.dtype)
            ids = jax.lax.dynamic_update_index_in_dim(ids, nxt[:, None], cur, axis=1)
            one = jnp.ones((b, 1), jnp.int32)
            mask = jax.lax.dynamic_update_index_in_dim(mask, one, cur, axis=1)
            return ids, mask, done | jnp.isin(nxt, eos), nxt

        done = jnp.zeros((b,), bool)
        if not use_cache:

            def body(t, carry):
                ids, mask, done = carry
                pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
                logits = self.module.apply({"params": params}, ids, mask, pos)
                last = jax.lax.dynamic_index_in_dim(logits, length + t - 1, 1, keepdims=False)
                return emit(t, ids, mask, done, last)[:3]

            return jax.lax.fori_loop(0, n, body, (ids, mask, done))[0]

        apply = functools.partial(self.module.apply, {"params": params})
        cache = init_cache(self.config, b, length + n, self.dtype)
        pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        # The prompt at slots 0 .. length-1, the mask over the whole buffer (later slots 0).
        logits, cache = apply(ids[:, :length], mask, pos[:, :length], cache, 0)

        def step(t, carry):
            ids, mask, done, cache, last = carry
            ids, mask, done, nxt = emit(t, ids, mask, done, last)
            cur = length + t
            at = jnp.sum(mask, axis=1, keepdims=True) - 1  # the new token's position id
            logits, cache = apply(nxt[:, None], mask, at, cache, cur)
            return ids, mask, done, cache, logits[:, 0]

        # The last iteration's forward pass feeds no token; it costs one token of compute.
        carry = (ids, mask, done, cache, logits[:, -1])
        return jax.lax.fori_loop(0, n, step, carry)[0]

    # ---------------------------------------------------------------------------- files
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str = "none",
        attention_impl: str | None = None,
        sharding_for=None,
        scan_layers: bool = False,
        **unused,
    ) -> NativeCausalLM:
        """From a local directory or a hub name; see `checkpoint_io.load_params`.

        ``scan_layers=True`` loads the weights straight into the scanned layout (stacked leaf
        by leaf; ``sharding_for`` sees the stacked paths and shapes) for a scanned model.
        """
        path = resolve(name_or_path)
        config = NativeConfig.from_file(path)
        msgpack = path / "flax_model.msgpack"
        if has_safetensors(path):
            params = checkpoint_io.load_params(
                path, config.tie_word_embeddings, param_dtype, sharding_for, scan_layers
            )
        elif msgpack.exists():
            tree = flax.serialization.msgpack_restore(msgpack.read_bytes())
            if scan_layers:  # numpy stacking, before anything goes to the device
                tree = stack_layers(tree, config.num_hidden_layers)
            params = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), tree)
        else:
            raise FileNotFoundError(
                f"no weights in {str(path)!r}: accepted model.safetensors, "
                "model.safetensors.index.json or flax_model.msgpack"
            )
        model = cls(
            config, params, dtype, param_dtype, remat, attention_impl, scan_layers=scan_layers
        )
        model.source = path
        return model

    def save_pretrained(self, out: str | Path, params: Any = None) -> Path:
        """``config.json`` + ``model.safetensors`` (PyTorch layout) in ``out``; scanned params
        are written under per-layer names."""
        cfg = self.config.hf_dict or _hf_config(self.config)
        return self._write(out, params, cfg, sort_keys=True)


def _ids(value) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]


def _hf_config(c: NativeConfig) -> dict:
    """A ``config.json`` for a config built without one (random models)."""
    arch = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
    }
    d = {
        "architectures": [arch[c.model_type]],
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope or None,
        "tie_word_embeddings": c.tie_word_embeddings,
        "pad_token_id": c.pad_token_id,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_id)
        if isinstance(c.eos_token_id, tuple)
        else c.eos_token_id,
        "sliding_window": c.sliding_window,
    }
    if c.model_type == "llama":
        d["attention_bias"] = c.qkv_bias
        d["mlp_bias"] = c.mlp_bias
    return d
