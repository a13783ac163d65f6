"""Greedy and beam search for an encoder-decoder, as PyTorch transformers' ``generate`` does it.

Both run over a fixed buffer of ``max_length`` decoder slots (slot 0: the decoder start token)
in one ``jax.lax.while_loop`` with the decoder's `KVCache`, and stop when transformers would.

* Logits processors, in transformers' order: `ban_repeated_ngrams` (``no_repeat_ngram_size``),
  ``min_length`` (EOS banned while ``cur_len < min_length``), forced BOS at ``cur_len == 1``,
  forced EOS at ``cur_len == max_length - 1``, then any extra ``(ids, scores, cur_len)``
  callables. Greedy applies them to the logits, beam search to the log-probabilities.
* Beam search is transformers' (4.50+ / 5.x) vectorised algorithm step for step: the top
  ``2 * num_beams`` continuations of all beams, the best ``num_beams`` unfinished ones running
  on, finished ones scored ``sum log p / (generated length) ** length_penalty`` and merged
  into the ``num_beams`` best, the early-stop heuristic and ``early_stopping`` (True, False,
  "never") as transformers' ``_check_early_stop_heuristic`` defines them. The same float32
  operations in the same order, so the outputs are token-identical (tested).

Example:
    >>> import jax.numpy as jnp
    >>> ids = jnp.array([[5, 6, 7, 5, 6, 0, 0]])  # cur_len 5: "5 6" was followed by 7 before
    >>> out = ban_repeated_ngrams(ids, jnp.zeros((1, 9)), 5, 3)
    >>> [int(t) for t in jnp.nonzero(jnp.isinf(out[0]))[0]]
    [7]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1.0e9  # transformers' "never choose" score


def ban_repeated_ngrams(ids: jax.Array, scores: jax.Array, cur_len: Any, n: int) -> jax.Array:
    """``-inf`` for every token that would repeat an n-gram of ``ids[:, :cur_len]`` (dense:
    for every position ``i`` whose ``n - 1`` tokens equal the last ``n - 1`` ones, the token at
    ``i + n - 1`` is banned)."""
    rows, length = ids.shape
    pos = jnp.arange(length)
    match = jnp.broadcast_to(pos + n - 1 < cur_len, (rows, length))
    start = cur_len - (n - 1)  # first of the last n - 1 tokens
    for k in range(n - 1):
        earlier = jnp.take(ids, jnp.clip(pos + k, 0, length - 1), axis=1)
        latest = jnp.take(ids, jnp.clip(start + k, 0, length - 1), axis=1)
        match = match & (earlier == latest[:, None])
    match = match & (start >= 0)
    banned_tok = jnp.take(ids, jnp.clip(pos + n - 1, 0, length - 1), axis=1)
    banned = jnp.zeros(scores.shape, bool).at[jnp.arange(rows)[:, None], banned_tok].max(match)
    return jnp.where(banned, -jnp.inf, scores)


@dataclasses.dataclass(frozen=True)
class Search:
    """Static decoding settings (hashable: one compiled program per setting)."""

    max_length: int
    num_beams: int = 1
    min_length: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    early_stopping: bool | str = False
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    eos_token_id: int = 2
    pad_token_id: int = 1
    start_token_id: int = 2
    extra: tuple[Callable, ...] = ()

    def __post_init__(self):
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length}: accepted >= 2 (start token + one)")
        if self.num_beams < 1:
            raise ValueError(f"num_beams={self.num_beams}: accepted >= 1")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(
                f"early_stopping={self.early_stopping!r}: accepted True, False or 'never'"
            )

    def process(self, ids: jax.Array, scores: jax.Array, cur_len: Any) -> jax.Array:
        """The logits processors at ``cur_len`` (tokens ``ids[:, :cur_len]`` generated)."""
        if self.no_repeat_ngram_size > 0:
            scores = ban_repeated_ngrams(ids, scores, cur_len, self.no_repeat_ngram_size)
        if self.min_length > 0:
            eos_col = jnp.arange(scores.shape[-1]) == self.eos_token_id
            scores = jnp.where(eos_col & (cur_len < self.min_length), -jnp.inf, scores)
        for token, at in (
            (self.forced_bos_token_id, 1),
            (self.forced_eos_token_id, self.max_length - 1),
        ):
            if token is not None:
                forced = jnp.where(jnp.arange(scores.shape[-1]) == token, 0.0, -jnp.inf)
                scores = jnp.where(cur_len == at, forced.astype(scores.dtype), scores)
        for proc in self.extra:
            scores = proc(ids, scores, cur_len)
        return scores


def greedy(step: Callable, cache: Any, batch: int, s: Search) -> jax.Array:
    """``step(tokens (B, 1), cache, index) -> (logits (B, V), cache)``; returns ``(B,
    max_length)`` sequences, finished rows padded with ``pad_token_id``."""
    ids = jnp.full((batch, s.max_length), s.pad_token_id, jnp.int32)
    ids = ids.at[:, 0].set(s.start_token_id)

    def cond(carry):
        cur, _, _, unfinished = carry
        return (cur < s.max_length) & jnp.any(unfinished)

    def body(carry):
        cur, ids, cache, unfinished = carry
        last = jax.lax.dynamic_index_in_dim(ids, cur - 1, 1, keepdims=True)
        logits, cache = step(last, cache, cur - 1)
        scores = s.process(ids, logits.astype(jnp.float32), cur)
        nxt = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        nxt = jnp.where(unfinished, nxt, s.pad_token_id)
        ids = jax.lax.dynamic_update_index_in_dim(ids, nxt[:, None], cur, axis=1)
        return cur + 1, ids, cache, unfinished & (nxt != s.eos_token_id)

    carry = (jnp.int32(1), ids, cache, jnp.ones((batch,), bool))
    return jax.lax.while_loop(cond, body, carry)[1]


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x[b, idx[b, j]]`` along axis 1 (transformers' ``_gather_beams``)."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def beam_search(step: Callable, cache: Any, batch: int, s: Search) -> jax.Array:
    """transformers' beam search. ``step`` as in `greedy` over ``batch * num_beams`` rows
    (beam-major within each example); ``cache`` holds the decoder cache of those rows with the
    batch axis at position 1 (``(layers, rows, ...)``). Returns the best sequence per example,
    ``(batch, max_length)``, padded with ``pad_token_id``."""
    k, L = s.num_beams, s.max_length
    keep = 2 * k  # max(2, 1 + number of EOS ids) * num_beams, one EOS id
    top_mask = jnp.arange(keep) < k
    lp = s.length_penalty
    # transformers divides by a Python float ``length ** lp``: the same values, cast once
    penalty = jnp.asarray(np.arange(L + 1, dtype=np.float64) ** lp, jnp.float32)
    running = jnp.full((batch, k, L), s.pad_token_id, jnp.int32).at[:, :, 0].set(s.start_token_id)
    running_scores = jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(NEG)
    state = dict(
        cur=jnp.int32(1),
        running=running,
        running_scores=running_scores,
        seqs=running,
        scores=jnp.full((batch, k), NEG, jnp.float32),
        finished=jnp.zeros((batch, k), bool),
        heuristic=jnp.ones((batch, 1), bool),
        hits=jnp.zeros((batch, keep), bool),
        cache=cache,
    )

    def cond(st):
        improvable = jnp.any(st["heuristic"])
        open_beam = ~(jnp.all(st["finished"]) & (s.early_stopping is True))
        return (st["cur"] < L) & improvable & open_beam & ~jnp.all(st["hits"])

    def body(st):
        cur = st["cur"]
        flat = st["running"].reshape(batch * k, L)
        last = jax.lax.dynamic_index_in_dim(flat, cur - 1, 1, keepdims=True)
        logits, cache = step(last, st["cache"], cur - 1)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        logp = s.process(flat, logp, cur)
        vocab = logp.shape[-1]
        acc = (logp.reshape(batch, k, vocab) + st["running_scores"][:, :, None]).reshape(batch, -1)
        top_lp, top_idx = jax.lax.top_k(acc, keep)
        origin = top_idx // vocab
        tokens = (top_idx % vocab).astype(jnp.int32)
        top_seqs = _gather(st["running"], origin)
        top_seqs = jax.lax.dynamic_update_index_in_dim(top_seqs, tokens[:, :, None], cur, axis=2)
        hits = (tokens == s.eos_token_id) | (cur + 1 >= L)
        # the best num_beams unfinished continuations run on
        run_lp = top_lp + hits.astype(jnp.float32) * NEG
        nxt = jax.lax.top_k(run_lp, k)[1]
        running = _gather(top_seqs, nxt)
        running_scores = _gather(run_lp, nxt)
        beam_origin = _gather(origin, nxt)  # (batch, k): each new beam's parent
        rows = (jnp.arange(batch)[:, None] * k + beam_origin).reshape(-1)
        cache = jax.tree.map(lambda c: jnp.take(c, rows, axis=1), cache)
        # finished ones (among the top num_beams) merge into the kept hypotheses
        did = hits & top_mask[None, :]
        fin_lp = top_lp / penalty[cur]  # generated length cur + 1 - 1 (the start token)
        full = jnp.all(st["finished"], axis=-1, keepdims=True) & (s.early_stopping is True)
        fin_lp = fin_lp + full.astype(jnp.float32) * NEG
        fin_lp = fin_lp + (~st["heuristic"]).astype(jnp.float32) * NEG
        fin_lp = fin_lp + (~did).astype(jnp.float32) * NEG
        m_seqs = jnp.concatenate([st["seqs"], top_seqs], axis=1)
        m_scores = jnp.concatenate([st["scores"], fin_lp], axis=1)
        m_fin = jnp.concatenate([st["finished"], did], axis=1)
        best = jax.lax.top_k(m_scores, k)[1]
        seqs, scores, finished = (
            _gather(m_seqs, best),
            _gather(m_scores, best),
            _gather(m_fin, best),
        )
        cur = cur + 1
        best_len = L - 1 if s.early_stopping == "never" and lp > 0.0 else cur - 1
        best_possible = running_scores[:, :1] / penalty[best_len]
        worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
        heuristic = st["heuristic"] & jnp.any(best_possible > worst, axis=-1, keepdims=True)
        return dict(
            cur=cur,
            running=running,
            running_scores=running_scores,
            seqs=seqs,
            scores=scores,
            finished=finished,
            heuristic=heuristic,
            hits=hits,
            cache=cache,
        )

    out = jax.lax.while_loop(cond, body, state)
    return out["seqs"][:, 0]
