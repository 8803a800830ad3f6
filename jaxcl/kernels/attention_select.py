"""SAPT's attentive selection: a query network, per-task keys, and the reflection (KL) loss.

A pooled input embedding ``e`` becomes a query ``q = LayerNorm(SiLU(e W_down W_up))`` (no activation
between the two linears, no biases); task t has a key ``k_t``; the weights over the T task adapters
are ``softmax(K q / sqrt(d))``. Tasks not trained yet are masked out so they get exactly zero weight.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

class QueryParams(NamedTuple):
    """The query network: ``w_down (d, h)``, ``w_up (h, d)``, LayerNorm ``ln_scale (d,)``, ``ln_bias (d,)``."""

    w_down: jax.Array
    w_up: jax.Array
    ln_scale: jax.Array
    ln_bias: jax.Array


def query_init(key: jax.Array, d: int, bottleneck: int = 100, dtype=jnp.float32) -> QueryParams:
    """Initialises the query network.

    Linears use torch's ``nn.Linear`` default, ``U(±1/sqrt(fan_in))``; LayerNorm starts at scale 1,
    bias 0.

    Args:
      key: PRNG key.
      d: model (embedding) width.
      bottleneck: hidden width h (100 in SAPT).
      dtype: parameter dtype.

    Returns:
      ``QueryParams(w_down (d, h), w_up (h, d), ln_scale (d,), ln_bias (d,))``.
    """
    k_down, k_up = jax.random.split(key)
    bound_down, bound_up = 1.0 / math.sqrt(d), 1.0 / math.sqrt(bottleneck)
    return QueryParams(
        w_down=jax.random.uniform(k_down, (d, bottleneck), dtype, -bound_down, bound_down),
        w_up=jax.random.uniform(k_up, (bottleneck, d), dtype, -bound_up, bound_up),
        ln_scale=jnp.ones((d,), dtype),
        ln_bias=jnp.zeros((d,), dtype),
    )


def task_key_init(key: jax.Array, d: int, dtype=jnp.float32) -> jax.Array:
    """A new task's key, ``U(−1, 1)`` as in SAPT.

    Args:
      key: PRNG key.
      d: model width.
      dtype: key dtype.

    Returns:
      ``(d,)``.
    """
    return jax.random.uniform(key, (d,), dtype, -1.0, 1.0)


def query(params: QueryParams, e: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Maps pooled input embeddings to attention queries, ``LayerNorm(SiLU(e W_down W_up))``.

    Args:
      params: from :func:`query_init`.
      e: ``(..., d)`` pooled input embeddings.
      eps: LayerNorm epsilon (torch's default).

    Returns:
      ``(..., d)`` queries.
    """
    h = jax.nn.silu((e @ params.w_down) @ params.w_up)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
    return (h - mean) * jax.lax.rsqrt(var + eps) * params.ln_scale + params.ln_bias


def attention_logits(keys: jax.Array, q: jax.Array, active: jax.Array | None = None) -> jax.Array:
    """Scaled dot products ``K q / sqrt(d)``, with inactive tasks at ``-inf``.

    Args:
      keys: ``(T, d)`` task keys.
      q: ``(B, d)`` queries (or ``(d,)``).
      active: optional boolean/0-1 mask of tasks that may be selected, ``(T,)`` or ``(B, T)``; at least
        one task per row must be active.

    Returns:
      ``(B, T)`` logits (``(T,)`` for a single query).
    """
    if keys.ndim != 2 or q.shape[-1] != keys.shape[1]:
        raise ValueError(f"attention_select: need keys (T, d) and q (..., d); got {keys.shape}, {q.shape}")
    logits = (q @ keys.T) / math.sqrt(keys.shape[1])
    if active is not None:
        logits = jnp.where(jnp.asarray(active, dtype=bool), logits, -jnp.inf)
    return logits


def select(keys: jax.Array, q: jax.Array, active: jax.Array | None = None) -> jax.Array:
    """Attention of each query over the task adapters, ``softmax(K q / sqrt(d))``.

    Args:
      keys: ``(T, d)`` task keys.
      q: ``(B, d)`` queries (or ``(d,)``).
      active: optional mask of selectable tasks, ``(T,)`` or ``(B, T)``; masked tasks get exactly 0.

    Returns:
      ``(B, T)`` weights, each row summing to 1.
    """
    return jax.nn.softmax(attention_logits(keys, q, active), axis=-1)


def kl_to_target(scores: jax.Array, target: jax.Array) -> jax.Array:
    """Attentive-reflection loss ``KL(target ‖ softmax(scores))``, averaged over the batch.

    Terms where the target is 0 contribute 0 (``0 · log 0 = 0``), so a past task's stored attention
    padded with zeros for later tasks is a valid target, and ``-inf`` logits of masked tasks are
    fine where the target is 0. Equals torch's ``KLDivLoss(reduction="batchmean")`` applied to
    ``log_softmax(scores)``, which SAPT uses.

    Args:
      scores: ``(B, T)`` attention logits (e.g. from :func:`attention_logits`).
      target: ``(B, T)`` or ``(T,)`` target distributions (rows sum to 1).

    Returns:
      scalar, >= 0.
    """
    if scores.ndim != 2 or target.shape[-1] != scores.shape[-1]:
        raise ValueError(
            f"attention_select.kl_to_target: need scores (B, T) and target (..., T); got {scores.shape}, {target.shape}"
        )
    target = jnp.broadcast_to(target, scores.shape)
    log_p = jax.nn.log_softmax(scores, axis=-1)
    support = target > 0
    safe_t = jnp.where(support, target, 1.0)
    safe_log_p = jnp.where(support, log_p, 0.0)
    terms = jnp.where(support, target * (jnp.log(safe_t) - safe_log_p), 0.0)
    return jnp.sum(terms) / scores.shape[0]
