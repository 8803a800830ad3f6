"""Parameter sensitivity, sparse masks and gradient dropping (MIST's building blocks).

Scores, masks and gradients are pytrees of the same structure; every operation is per tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fisher_scores(grads_sq_sum, n):
    """Empirical Fisher diagonal: the mean squared gradient per entry.

    Args:
      grads_sq_sum: pytree of accumulated squared gradients ``Σ_b g_b²`` (any shapes).
      n: number of accumulated gradients (batches), > 0.

    Returns:
      pytree like ``grads_sq_sum`` holding ``Σ_b g_b² / n``.
    """
    if isinstance(n, (int, float)) and n <= 0:
        raise ValueError(f"sensitivity.fisher_scores: n must be > 0, got {n}")
    return jax.tree.map(lambda g: g / n, grads_sq_sum)


def _count(fraction: float, size: int) -> int:
    if fraction == 0.0:
        return 0
    # The quantile rule "score >= quantile(1 - fraction)" always keeps the maximum, so any
    # positive fraction keeps at least one entry, even in a tiny tensor.
    return min(size, max(1, round(fraction * size)))


def _topk_leaf(scores: jax.Array, fraction: float) -> jax.Array:
    k = _count(fraction, scores.size)
    flat = scores.reshape(-1)
    # A stable sort breaks ties by position, so the mask has exactly k entries even when scores tie.
    order = jnp.argsort(flat, descending=True, stable=True)
    # Comparing ranks with k (instead of slicing order[:k]) keeps k out of the shapes, so a new
    # fraction does not trigger a recompilation.
    ranks = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return (ranks < k).reshape(scores.shape)


def topk_mask(scores, fraction: float):
    """Per-tensor mask of the highest-scoring entries.

    Keeps ``k = round(fraction · size)`` entries of each tensor (at least one when ``fraction > 0``):
    the entries with ``score >= quantile(1 − fraction)``, with ties broken deterministically (by
    flattened index, lower first) so the count is always k — within one entry of the asked fraction.

    Args:
      scores: pytree of score arrays (any shapes).
      fraction: share of entries to keep per tensor, a Python float in [0, 1].

    Returns:
      pytree of boolean masks with the shapes of ``scores``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"sensitivity.topk_mask: fraction must be in [0, 1], got {fraction}")
    return jax.tree.map(lambda s: _topk_leaf(jnp.asarray(s), fraction), scores)


def drop_gradients(key: jax.Array, grads, mask, keep_prob, rescale: bool = False):
    """Sparse, randomly thinned gradients.

    Entries outside ``mask`` become 0. Inside, each entry is kept independently with probability
    ``keep_prob`` (MIST drops with p = 0.9, i.e. ``keep_prob = 0.1``) and zeroed otherwise. Kept
    entries are left unscaled by default, as MIST does, so the expected update shrinks by
    ``keep_prob``; ``rescale=True`` divides them by ``keep_prob`` (unbiased, inverted-dropout style).

    Args:
      key: PRNG key; each tensor gets its own subkey.
      grads: pytree of gradient arrays.
      mask: pytree of the same structure, boolean (or 0/1) arrays broadcastable to the gradients.
      keep_prob: probability in [0, 1] of keeping a masked entry (> 0 when ``rescale``).
      rescale: divide kept entries by ``keep_prob``.

    Returns:
      pytree like ``grads``.
    """
    if isinstance(keep_prob, (int, float)) and not (0.0 < keep_prob <= 1.0 if rescale else 0.0 <= keep_prob <= 1.0):
        allowed = "(0, 1] with rescale=True" if rescale else "[0, 1]"
        raise ValueError(f"sensitivity.drop_gradients: keep_prob must be in {allowed}, got {keep_prob}")
    leaves, treedef = jax.tree.flatten(grads)
    masks = treedef.flatten_up_to(mask)
    keys = jax.random.split(key, len(leaves))

    def drop(k, g, m):
        keep = jnp.logical_and(jnp.asarray(m, dtype=bool), jax.random.bernoulli(k, keep_prob, g.shape))
        kept = g / jnp.asarray(keep_prob, g.dtype) if rescale else g
        return jnp.where(keep, kept, jnp.zeros_like(g))

    return treedef.unflatten([drop(k, g, m) for k, g, m in zip(keys, leaves, masks)])


def info_nce_per_anchor(z: jax.Array, labels: jax.Array, temperature: float = 0.07) -> jax.Array:
    """The supervised contrastive loss of each anchor (SupCon), ``(N,)``.

    Every row of ``z`` (L2-normalised here) is an anchor; its positives are the other rows with the
    same label, and its softmax runs over all N − 1 other rows:
    ``loss_i = −(1/|P(i)|) Σ_{p∈P(i)} log [exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ)]``.
    Per-anchor terms make per-example gradients (and so MIST's Fisher scores) possible.

    Args:
      z: ``(N, D)`` embeddings, e.g. two views of B examples stacked (N = 2B).
      labels: ``(N,)`` integer labels; every row needs at least one positive.
      temperature: softmax temperature τ.

    Returns:
      ``(N,)`` losses, computed in at least float32.

    Examples:
      >>> z = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
      >>> per = info_nce_per_anchor(z, jnp.array([0, 1, 0, 1]))
      >>> per.shape, bool((per < 0.01).all())     # aligned views: near-zero loss
      ((4,), True)
    """
    if z.ndim != 2 or labels.shape != (z.shape[0],):
        raise ValueError(f"sensitivity.info_nce_per_anchor: need z (N, D) and labels (N,); got {z.shape}, {labels.shape}")
    dtype = jnp.promote_types(z.dtype, jnp.float32)
    z = z.astype(dtype)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), jnp.finfo(dtype).tiny)
    others = ~jnp.eye(z.shape[0], dtype=bool)
    positives = (labels[:, None] == labels[None, :]) & others
    log_prob = jax.nn.log_softmax((z @ z.T) / temperature, axis=-1, where=others)
    return -jnp.sum(jnp.where(positives, log_prob, 0.0), axis=-1) / jnp.sum(positives, axis=-1)


def info_nce(z1: jax.Array, z2: jax.Array, labels: jax.Array, temperature: float = 0.07) -> jax.Array:
    """Supervised contrastive loss (SupCon) over two views of a batch.

    The 2B embeddings are L2-normalised; each one is an anchor whose positives are every other
    embedding with the same label (always including the other view of the same example), and whose
    softmax runs over all 2B − 1 other embeddings. Computed in at least float32.

    ``loss = −mean_i (1/|P(i)|) Σ_{p∈P(i)} log [exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ)]``

    Args:
      z1: ``(B, D)`` first view.
      z2: ``(B, D)`` second view of the same examples.
      labels: ``(B,)`` integer class labels.
      temperature: softmax temperature τ.

    Returns:
      scalar loss.
    """
    if z1.ndim != 2 or z1.shape != z2.shape or labels.shape != (z1.shape[0],):
        raise ValueError(
            f"sensitivity.info_nce: need z1, z2 (B, D) and labels (B,); got {z1.shape}, {z2.shape}, {labels.shape}"
        )
    return jnp.mean(info_nce_per_anchor(jnp.concatenate([z1, z2]), jnp.concatenate([labels, labels]), temperature))
