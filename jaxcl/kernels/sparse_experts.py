"""Hard-concrete masks and their interpolation (SMAT's sparse experts).

A hard-concrete gate (Louizos et al., 2018) is a binary-concrete sample ``s`` in (0, 1) stretched to
(γ, ζ) with γ < 0 < 1 < ζ and clipped to [0, 1], so it is exactly 0 or 1 with positive probability
while staying differentiable in its log-odds ``log_alpha``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG_ALPHA_MIN = math.log(0.01)
LOG_ALPHA_MAX = math.log(100.0)


def _stretch_and_clip(s: jax.Array, zeta: float, gamma: float) -> jax.Array:
    return jnp.clip(s * (zeta - gamma) + gamma, 0.0, 1.0)


def hard_concrete(
    key: jax.Array | None,
    log_alpha: jax.Array,
    beta: float = 2 / 3,
    zeta: float = 1.1,
    gamma: float = -0.1,
    train: bool = True,
) -> jax.Array:
    """Samples (train) or evaluates (eval) hard-concrete gates.

    Train: ``u ~ U(0, 1)``, ``s = sigmoid((log u − log(1 − u) + log_alpha) / β)``.
    Eval: the noise-free gate ``s = sigmoid(log_alpha)`` (β = 1 and the logistic noise at its
    median 0), deterministic. Both are then stretched, ``s (ζ − γ) + γ``, and clipped to [0, 1].

    Args:
      key: PRNG key (unused and may be ``None`` when ``train`` is False).
      log_alpha: ``(...)`` gate log-odds.
      beta: temperature of the binary concrete (train only).
      zeta: right end of the stretch, > 1.
      gamma: left end of the stretch, < 0.
      train: Python bool, sample (True) or evaluate deterministically (False).

    Returns:
      gates in [0, 1] with the shape and (floating) dtype of ``log_alpha``.
    """
    if not (gamma < 0.0 and zeta > 1.0 and beta > 0.0):
        raise ValueError(
            f"sparse_experts.hard_concrete: need gamma < 0 < 1 < zeta and beta > 0; got {gamma=}, {zeta=}, {beta=}"
        )
    log_alpha = jnp.asarray(log_alpha)
    if not jnp.issubdtype(log_alpha.dtype, jnp.floating):
        log_alpha = log_alpha.astype(jnp.float32)
    if not train:
        return _stretch_and_clip(jax.nn.sigmoid(log_alpha), zeta, gamma)
    if key is None:
        raise ValueError("sparse_experts.hard_concrete: train=True needs a PRNG key")
    tiny = jnp.finfo(log_alpha.dtype).eps
    u = jax.random.uniform(key, log_alpha.shape, log_alpha.dtype, minval=tiny, maxval=1.0 - tiny)
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / beta)
    return _stretch_and_clip(s, zeta, gamma)


def expected_l0(log_alpha: jax.Array, beta: float = 2 / 3, zeta: float = 1.1, gamma: float = -0.1) -> jax.Array:
    """Probability that a train-mode gate is non-zero: ``sigmoid(log_alpha − β log(−γ/ζ))``.

    Elementwise; sum it for the expected L0 norm of a mask or average it for the expected density
    (1 − sparsity) that SMAT's Lagrangian constrains.

    Args:
      log_alpha: ``(...)`` gate log-odds.
      beta, zeta, gamma: as in :func:`hard_concrete`.

    Returns:
      ``(...)`` probabilities.
    """
    return jax.nn.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def interpolate(masks: jax.Array, weights: jax.Array) -> jax.Array:
    """Mixes expert masks: ``m = Σ_i s_i z_i``.

    Args:
      masks: ``(E, ...)`` one mask per expert.
      weights: ``(E,)`` expert weights, or ``(B, E)`` one weighting per example/task.

    Returns:
      ``(...)`` for ``(E,)`` weights, ``(B, ...)`` for ``(B, E)`` weights.
    """
    if weights.ndim not in (1, 2) or weights.shape[-1] != masks.shape[0]:
        raise ValueError(
            f"sparse_experts.interpolate: weights must be (E,) or (B, E) with E = masks.shape[0] = "
            f"{masks.shape[0]}; got {weights.shape}"
        )
    return jnp.tensordot(weights, masks, axes=([-1], [0]))


def init_log_alpha(key: jax.Array, shape, std: float = 0.5, dtype=jnp.float32) -> jax.Array:
    """Initial gate log-odds ``N(0, std²)`` clamped to ``[ln 0.01, ln 100]``.

    Args:
      key: PRNG key.
      shape: output shape, e.g. ``(E, *weight_shape)``.
      std: standard deviation of the normal.
      dtype: output dtype.

    Returns:
      array of ``shape``.
    """
    return jnp.clip(std * jax.random.normal(key, shape, dtype), LOG_ALPHA_MIN, LOG_ALPHA_MAX)
