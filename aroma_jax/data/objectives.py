"""Losses and predictions for HF Flax models, per task kind.

Each builder takes an HF Flax model object (``FlaxPreTrainedModel``: ``model(..., params=...,
dropout_rng=..., train=...)``) and returns pure functions of ``(params, batch, rng)`` that jit
cleanly and pick up AROMA adapters when called inside `AromaTrainer` (or ``trainer.applied``).

Batch layouts (numpy/jax dicts):

* classification / regression / pairs: ``input_ids``, ``attention_mask``, optional
  ``token_type_ids``, ``labels`` (int class ids, or floats for regression);
* causal LM: ``input_ids``, ``attention_mask``, ``loss_mask`` (1 on target tokens whose
  *prediction* counts; position ``t`` predicts token ``t+1``);
* seq2seq: ``input_ids``, ``attention_mask``, ``decoder_input_ids``, ``decoder_attention_mask``,
  ``labels`` (-100 where ignored).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _inputs(batch: dict, names=MODEL_INPUTS) -> dict:
    return {k: batch[k] for k in names if k in batch}


def classification(model: Any, regression: bool = False) -> tuple[Callable, Callable]:
    """(loss_fn, predict_fn) for sequence classification (cross-entropy) or regression (MSE)."""

    def logits_of(params, batch, rng, train):
        kwargs = {"dropout_rng": rng} if train else {}
        return model(**_inputs(batch), params=params, train=train, **kwargs).logits

    def loss_fn(params, batch, rng):
        logits = logits_of(params, batch, rng, True).astype(jnp.float32)
        if regression:
            return jnp.mean(jnp.square(logits[:, 0] - batch["labels"].astype(jnp.float32)))
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]))

    def predict_fn(params, batch):
        logits = logits_of(params, batch, None, False).astype(jnp.float32)
        return logits[:, 0] if regression else jnp.argmax(logits, -1)

    return loss_fn, predict_fn


def causal_lm(model: Any) -> tuple[Callable, Callable]:
    """(loss_fn, token_logprob_fn) for a decoder-only LM with a target-token mask."""

    def token_logprobs(params, batch, rng, train):
        kwargs = {"dropout_rng": rng} if train else {}
        logits = model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            params=params,
            train=train,
            **kwargs,
        ).logits.astype(jnp.float32)
        targets = batch["input_ids"][:, 1:]
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    def loss_fn(params, batch, rng):
        lp = token_logprobs(params, batch, rng, True)
        mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
        return -jnp.sum(lp * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    def score_fn(params, batch):
        """Sum of target-token log-probabilities per example (multiple-choice scoring)."""
        lp = token_logprobs(params, batch, None, False)
        return jnp.sum(lp * batch["loss_mask"][:, 1:].astype(jnp.float32), axis=-1)

    return loss_fn, score_fn


def causal_lm_tokens(batch: dict) -> Array:
    """What `causal_lm`'s loss averages over: its target tokens (``loss_mask[:, 1:]``).

    Passed as ``AromaTrainer(..., loss_weight=...)`` so accumulated micro-batches weigh by
    their target tokens and sum to the full batch's gradient, not a mean of micro-means.
    """
    return jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32))


def seq2seq_tokens(batch: dict) -> Array:
    """What `seq2seq`'s loss averages over: the labels that are not ``-100``."""
    return jnp.sum((batch["labels"] != -100).astype(jnp.float32))


def seq2seq(model: Any) -> tuple[Callable, Callable]:
    """(loss_fn, generate_fn) for an encoder-decoder model (BART)."""

    def loss_fn(params, batch, rng):
        logits = model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"],
            decoder_attention_mask=batch["decoder_attention_mask"],
            params=params,
            dropout_rng=rng,
            train=True,
        ).logits.astype(jnp.float32)
        labels = batch["labels"]
        mask = (labels != -100).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    def generate_fn(params, batch, max_length: int = 24):
        return model.generate(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            params=params,
            max_length=max_length,
            num_beams=1,
        ).sequences

    return loss_fn, generate_fn
