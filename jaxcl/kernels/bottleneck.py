"""Budget-adaptive bottleneck adapters (OA-Adapter's math): soft-thresholded gates and the
orthogonality of a new task's subspace to the active part of past tasks' subspaces.

An adapter at a site adds ``s · W2 diag(γ) W1 x`` with ``W1 (r, d_in)``, ``W2 (d_out, r)`` and
``γ = soft_threshold(g, τ)``; the task's budget at the site is ``r_eff = ‖γ‖₀``.

References:
  OA-Adapter: budget-adaptive orthogonal adapters for continual learning of LLMs (no public code;
  jaxcl's choices are documented in ``jaxcl/methods/oa_adapter.py`` and ``docs/methods.md``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_threshold(g: jax.Array, tau: jax.Array) -> jax.Array:
    """``sign(g) · max(|g| − τ, 0)`` with the threshold held at ``τ ≥ 0``.

    Exact zeros where ``|g| ≤ τ``; a negative τ would amplify every dimension instead of gating
    it, so it acts as 0. ``τ`` broadcasts against ``g``. The gradient w.r.t. ``τ`` is that of the
    unclamped formula (straight through the clamp): at ``τ = 0``, OA-Adapter's initial threshold
    and where its clamp puts a threshold pushed negative, the L1 term must still be able to raise it.

    Examples:
      >>> soft_threshold(jnp.array([0.5, -2.0, 1.0]), jnp.array(1.0)).tolist()
      [0.0, -1.0, 0.0]
      >>> soft_threshold(jnp.array([0.5, -2.0]), jnp.array(-3.0)).tolist()   # τ < 0 acts as 0
      [0.5, -2.0]
    """
    held = tau + jax.lax.stop_gradient(jnp.maximum(tau, 0) - tau)
    return jnp.sign(g) * jax.nn.relu(jnp.abs(g) - held)


def adapter_output(x: jax.Array, w1: jax.Array, gamma: jax.Array, w2: jax.Array) -> jax.Array:
    """``(x W1ᵀ ⊙ γ) W2ᵀ`` for one adapter ``(r, d_in), (r,), (d_out, r)`` or a bank
    ``(T, r, d_in), (T, r), (T, d_out, r)`` (summed over T), in ``x.dtype``.

    Examples:
      >>> x = jnp.ones((2, 3))
      >>> w1, w2 = jnp.ones((4, 3)), jnp.ones((5, 4))
      >>> adapter_output(x, w1, jnp.array([1.0, 0.0, 0.0, 0.0]), w2)[0].tolist()
      [3.0, 3.0, 3.0, 3.0, 3.0]
    """
    if w1.ndim == 2:
        w1, gamma, w2 = w1[None], gamma[None], w2[None]
    h = jnp.einsum("...d,trd->...tr", x, w1.astype(x.dtype)) * gamma.astype(x.dtype)
    return jnp.einsum("...tr,tor->...o", h, w2.astype(x.dtype))


def orthogonality_penalty(past_w2: jax.Array, past_gamma: jax.Array, w2: jax.Array) -> jax.Array:
    """``Σ_s ‖W2_s[:, active_s]ᵀ W2‖_F²`` at one site and layer.

    Args:
      past_w2: ``(T, d_out, r)`` past tasks' W2 (empty slots are zero).
      past_gamma: ``(T, r)`` their gates; a column is active where its gate is non-zero.
      w2: ``(d_out, r)`` the current task's W2.

    Returns:
      scalar, 0 exactly when the current columns are orthogonal to every active past column.

    Examples:
      >>> e = jnp.eye(4)
      >>> past = e[None, :, :2]                  # one past task using directions 0 and 1
      >>> float(orthogonality_penalty(past, jnp.ones((1, 2)), e[:, 2:]))
      0.0
      >>> float(orthogonality_penalty(past, jnp.array([[1.0, 0.0]]), e[:, 1:3]))   # column 1 is off
      0.0
      >>> float(orthogonality_penalty(past, jnp.ones((1, 2)), e[:, 1:3]))
      1.0
    """
    active = (past_gamma != 0).astype(w2.dtype)
    overlap = jnp.einsum("tos,or->tsr", past_w2.astype(w2.dtype), w2) * active[:, :, None]
    return jnp.sum(overlap ** 2)


def active_columns(past_w2: jax.Array, past_gamma: jax.Array) -> jax.Array:
    """``(d_out, T·r)``: every past W2 column, zeroed where its task switched it off.

    Args:
      past_w2: ``(T, d_out, r)``.
      past_gamma: ``(T, r)``.
    """
    w2 = past_w2 * (past_gamma != 0).astype(past_w2.dtype)[:, None, :]
    tasks, d_out, rank = w2.shape
    return jnp.transpose(w2, (1, 0, 2)).reshape(d_out, tasks * rank)
