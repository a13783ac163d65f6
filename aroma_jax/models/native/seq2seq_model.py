"""`NativeSeq2SeqLM`: the native BART behind HF Flax's calling convention.

``model(input_ids, attention_mask=..., decoder_input_ids=..., decoder_attention_mask=...,
params=..., train=..., dropout_rng=...).logits`` (`aroma_jax.data.objectives.seq2seq`),
``model.generate(input_ids, attention_mask=..., params=..., max_length=..., num_beams=...,
...).sequences`` (greedy or beam search: `seq2seq_search`), ``model.config``, ``model.params``,
``model.save_pretrained(dir, params=...)``.

* `from_pretrained` reads ``config.json`` (+ ``generation_config.json``) and safetensors; the
  tied copies of the shared embedding (``model.{encoder,decoder}.embed_tokens``, ``lm_head``)
  are not read twice. `save_pretrained` writes PyTorch layout, with the tied names too, so
  ``AutoModelForSeq2SeqLM`` (transformers 4.x and 5.x) loads it.
* Generation defaults come from the checkpoint (bart-large-xsum: 6 beams, min 11, max 62,
  no-repeat 3, forced BOS 0 / EOS 2, early stopping); keywords override them, and the
  pipeline passes every one explicitly.

Example:
    >>> from aroma_jax.models.native.bart import BartConfig
    >>> cfg = BartConfig.from_dict({"model_type": "bart", "vocab_size": 40, "d_model": 16,
    ...     "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 4,
    ...     "decoder_attention_heads": 4, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
    ...     "max_position_embeddings": 32})
    >>> import numpy as np
    >>> m = NativeSeq2SeqLM(cfg)
    >>> m.generate(np.full((2, 6), 7), max_length=5, num_beams=2).sequences.shape
    (2, 5)
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from aroma_jax.models.native import checkpoint_io, pt_layout
from aroma_jax.models.native.bart import BartConfig, Seq2SeqLM
from aroma_jax.models.native.checkpoint_io import CheckpointError
from aroma_jax.models.native.modeling import KVCache
from aroma_jax.models.native.seq2seq_search import Search, beam_search, greedy
from aroma_jax.models.native.wrapper import (
    GenerateOutput,
    LogitsOutput,
    NativeWrapper,
    first_set,
    on_device,
    resolve,
)

ENCODER_AT = ("model", "encoder", "layers")
DECODER_AT = ("model", "decoder", "layers")
TIED = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")
HF_DEFAULTS = dict(
    num_beams=1,
    max_length=20,
    min_length=0,
    length_penalty=1.0,
    no_repeat_ngram_size=0,
    early_stopping=False,
    forced_bos_token_id=None,
    forced_eos_token_id=None,
)


class NativeSeq2SeqLM(NativeWrapper):
    """A `Seq2SeqLM` with its config and params and the HF Flax calling convention
    (`NativeWrapper`: the scanned layout of both stacks, params, dropout, saving)."""

    module_class = Seq2SeqLM

    @property
    def layer_stacks(self) -> tuple[tuple[tuple[str, ...], int], ...]:
        c = self.config
        return ((ENCODER_AT, c.encoder_layers), (DECODER_AT, c.decoder_layers))

    def init_inputs(self) -> tuple:
        ids = jnp.ones((1, 2), jnp.int32)
        return (ids, None, ids)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        params=None,
        train: bool = False,
        dropout_rng=None,
        **unused,
    ) -> LogitsOutput:
        """Teacher-forced logits ``(batch, target length, vocab)``."""
        del unused
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids is required (the shifted targets)")
        args = [
            None if a is None else jnp.asarray(a)
            for a in (input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
        ]
        return self._apply(params, args, train, dropout_rng)

    # ---------------------------------------------------------------------------- decoding
    def search_settings(self, **kw) -> Search:
        """`Search` from keywords, else the checkpoint's generation config, else HF's defaults."""
        c = self.config
        gen = {**HF_DEFAULTS, **dict(c.generation)}
        # a forced token given as None switches it off; other Nones mean "the default"
        gen.update(
            {k: v for k, v in kw.items() if k in HF_DEFAULTS and (v is not None or "forced" in k)}
        )
        if kw.get("max_new_tokens") is not None:
            gen["max_length"] = int(kw["max_new_tokens"]) + 1
        extra = tuple(kw.get("logits_processor") or ())
        return Search(
            max_length=int(gen["max_length"]),
            num_beams=int(gen["num_beams"]),
            min_length=int(gen["min_length"] or 0),
            length_penalty=float(gen["length_penalty"]),
            no_repeat_ngram_size=int(gen["no_repeat_ngram_size"] or 0),
            early_stopping=gen["early_stopping"],
            forced_bos_token_id=gen["forced_bos_token_id"],
            forced_eos_token_id=gen["forced_eos_token_id"],
            eos_token_id=int(first_set(kw.get("eos_token_id"), c.eos_token_id)),
            pad_token_id=int(first_set(kw.get("pad_token_id"), c.pad_token_id)),
            start_token_id=int(
                first_set(kw.get("decoder_start_token_id"), c.decoder_start_token_id)
            ),
            extra=extra,
        )

    def generate(self, input_ids, attention_mask=None, params=None, **kw) -> GenerateOutput:
        """Greedy (``num_beams=1``) or beam search from the encoder inputs; ``sequences``
        ``(batch, max_length)`` start with the decoder start token and end in padding.

        Keywords (HF's names): ``max_length`` / ``max_new_tokens``, ``min_length``,
        ``num_beams``, ``length_penalty``, ``no_repeat_ngram_size``, ``early_stopping``,
        ``forced_bos_token_id``, ``forced_eos_token_id``, ``eos_token_id``, ``pad_token_id``,
        ``decoder_start_token_id``, ``logits_processor`` (extra ``(ids, scores, cur_len)``
        callables, applied last). Sampling is rejected.
        """
        if kw.pop("do_sample", False):
            raise ValueError("do_sample=True is not supported for BART: accepted greedy or beams")
        search = self.search_settings(**kw)
        params = self.params if params is None else params
        ids = jnp.asarray(input_ids)
        mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask)
        fn = self._generate_fns.get(search)
        if fn is None:
            fn = jax.jit(functools.partial(self._decode, search=search))
            self._generate_fns[search] = fn
        return GenerateOutput(fn(params, ids, mask))

    def _decode(self, params, ids, mask, *, search: Search):
        c, k = self.config, search.num_beams
        b = ids.shape[0]
        apply = functools.partial(self.module.apply, {"params": params})
        enc = apply(ids, mask, method=Seq2SeqLM.encode)
        if k > 1:  # beam-major rows: example i's beams at i*k .. i*k + k-1
            enc, mask = jnp.repeat(enc, k, axis=0), jnp.repeat(mask, k, axis=0)
        heads = c.decoder_attention_heads
        shape = (c.decoder_layers, b * k, search.max_length, heads, c.d_model // heads)
        cache = KVCache(jnp.zeros(shape, enc.dtype), jnp.zeros(shape, enc.dtype))

        def step(tokens, cache, index):
            logits, cache = apply(tokens, enc, mask, None, cache, index, method=Seq2SeqLM.decode)
            return logits[:, -1], cache

        if k == 1:
            return greedy(step, cache, b, search)
        return beam_search(step, cache, b, search)

    # ---------------------------------------------------------------------------- files
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str = "none",
        attention_impl: str | None = None,
        seed: int = 0,
        scan_layers: bool = False,
        **unused,
    ) -> NativeSeq2SeqLM:
        """From a local directory or a hub name (config, safetensors, tokenizer files)."""
        path = resolve(name_or_path)
        config = BartConfig.from_file(path)
        model = cls(config, {}, dtype, param_dtype, remat, attention_impl, seed, False)
        names = set(checkpoint_io.checkpoint_files(path))

        def rename(name: str) -> str | None:
            if name in TIED:  # copies of model.shared (or its only copy)
                if "model.shared.weight" in names or name == "lm_head.weight":
                    return None
                return "model.shared.weight" if name == TIED[0] else None
            return name

        loaded = pt_layout.read_checkpoint(path, rename)
        shapes = model.param_shapes(seed)
        bad = sorted("/".join(p) for p in set(loaded) ^ set(shapes))
        bad = [p for p in bad if p != "final_logits_bias"]
        if bad:
            raise CheckpointError(f"{str(path)!r} is not a BART checkpoint: {bad[:5]} differ")
        flat = {}
        pdt = np.dtype(param_dtype)
        for p, s in shapes.items():
            w = loaded.get(p)
            if w is None:  # final_logits_bias: a buffer some checkpoints leave out
                w = np.zeros(s.shape, pdt)
            if tuple(w.shape) != tuple(s.shape):
                raise CheckpointError(f"{'/'.join(p)}: {tuple(w.shape)} != {tuple(s.shape)}")
            flat[p] = on_device(w, pdt)
        params = traverse_util.unflatten_dict(flat)
        model = cls(config, params, dtype, param_dtype, remat, attention_impl, seed, scan_layers)
        model.source = path
        return model

    def save_pretrained(self, out: str | Path, params: Any = None) -> Path:
        """``config.json``, ``generation_config.json`` and ``model.safetensors`` (PyTorch
        layout, tied embedding names included)."""
        params = jax.device_get(self.params if params is None else params)
        gen = dict(self.config.generation)
        gen.update(
            decoder_start_token_id=self.config.decoder_start_token_id,
            bos_token_id=self.config.bos_token_id,
            eos_token_id=self.config.eos_token_id,
            pad_token_id=self.config.pad_token_id,
        )
        shared = params["model"]["shared"]["embedding"]
        tied = {
            "model": {n: {"embed_tokens": {"embedding": shared}} for n in ("encoder", "decoder")},
            "lm_head": {"embedding": shared},
        }
        out = self._write(
            out,
            _merge(params, tied),
            hf_config(self.config),
            to_torch=pt_layout.to_torch,
            layers_at=self.layers_at,
        )
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
        return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if key in out and isinstance(value, dict) else value
    return out


def hf_config(c: BartConfig) -> dict:
    """``config.json`` of a ``BartForConditionalGeneration``: the source's keys, with this
    model's sizes."""
    d = dict(c.hf_dict)
    fields = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}
    fields.pop("generation")
    fields.pop("raw")
    d.update(fields)
    d.update(
        model_type="bart",
        architectures=["BartForConditionalGeneration"],
        is_encoder_decoder=True,
        tie_word_embeddings=True,
    )
    return d
