"""Orthogonal subspaces: Gram-Schmidt, projections and O-LoRA's orthogonality penalty.

Conventions: a subspace is spanned by the COLUMNS of a ``(d, k)`` matrix. LoRA ``a`` matrices hold
their directions in ROWS ``(r, d_in)``, so pass ``a.T`` to :func:`gram_schmidt`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Orthogonality is the point of this module, so TF32/bf16 matmul passes (GPU/TPU defaults) are avoided.
_HIGHEST = jax.lax.Precision.HIGHEST

# Jitted so the column loop compiles once per shape rather than on every eager call.
@functools.partial(jax.jit, static_argnames="rtol")
def gram_schmidt(V: jax.Array, rtol: float | None = None) -> jax.Array:
    """Orthonormalises the columns of ``V`` by modified Gram-Schmidt.

    Columns are processed left to right; once column j is normalised its component is removed from
    every later column (the row-oriented form of MGS, one vectorised step per column). A column
    whose remaining norm is ``<= rtol * (its original norm)`` is numerically in the span of the
    columns before it and comes out exactly zero (an all-zero column always does), so ``Q`` may hold
    zero columns and ``Q Qᵀ`` is still the projector onto span(V).

    Args:
      V: ``(d, k)`` matrix whose columns span the subspace.
      rtol: relative tolerance for dropping a dependent column; default ``sqrt(eps)`` of V's dtype
        (≈3.5e-4 in float32, 1.5e-8 in float64), far above the rounding residue of a dependent
        column and far below what a genuinely new direction leaves.

    Returns:
      ``Q`` of shape ``(d, k)``, in V's dtype promoted to at least float32: orthonormal columns, or
      exact zeros for dependent ones.
    """
    if V.ndim != 2:
        raise ValueError(f"orthogonal.gram_schmidt: V must be (d, k), got shape {V.shape}")
    V = V.astype(jnp.promote_types(V.dtype, jnp.float32))
    if rtol is None:
        rtol = float(jnp.finfo(V.dtype).eps) ** 0.5
    k = V.shape[1]
    thresholds = rtol * jnp.linalg.norm(V, axis=0)
    later = jnp.arange(k)

    def step(j, A):
        v = A[:, j]
        norm = jnp.linalg.norm(v)
        independent = norm > thresholds[j]
        q = jnp.where(independent, v / jnp.where(independent, norm, 1.0), 0.0)
        A = A.at[:, j].set(q)
        coeffs = jnp.where(later > j, jnp.matmul(q, A, precision=_HIGHEST), 0.0)  # later columns along q
        return A - jnp.outer(q, coeffs)

    return jax.lax.fori_loop(0, k, step, V)


def project_out(G: jax.Array, Q: jax.Array) -> jax.Array:
    """Removes from ``G`` its component in span(Q): ``G − Q (Qᵀ G)``.

    Args:
      G: ``(d,)`` or ``(d, n)`` vectors in columns (e.g. a gradient of ``a.T``).
      Q: ``(d, k)`` orthonormal-or-zero columns, as returned by :func:`gram_schmidt`.

    Returns:
      same shape as G, orthogonal to every column of Q.
    """
    if Q.ndim != 2 or G.shape[0] != Q.shape[0]:
        raise ValueError(f"orthogonal.project_out: need Q (d, k) and G (d, ...) with equal d; got {G.shape}, {Q.shape}")
    return G - jnp.matmul(Q, jnp.matmul(Q.T, G, precision=_HIGHEST), precision=_HIGHEST)


def olora_penalty(A_past: jax.Array, A_new: jax.Array) -> jax.Array:
    """O-LoRA's orthogonality loss at one site: ``Σ |A_past A_newᵀ|`` (elementwise L1).

    This is what O-LoRA's official trainer adds per site (``abs(mm(lora_A, loranew_A.T)).sum()``),
    summed over sites and weighted by λ1 by the caller.

    Args:
      A_past: ``(R, d_in)`` rows of all past tasks' ``a`` (R may be 0).
      A_new: ``(r, d_in)`` rows of the current task's ``a``.

    Returns:
      scalar.
    """
    if A_past.ndim != 2 or A_new.ndim != 2 or A_past.shape[1] != A_new.shape[1]:
        raise ValueError(
            f"orthogonal.olora_penalty: need A_past (R, d_in) and A_new (r, d_in); got {A_past.shape}, {A_new.shape}"
        )
    return jnp.abs(A_past @ A_new.T).sum()


def subspace_overlap(U: jax.Array, V: jax.Array) -> jax.Array:
    """Overlap of two column spaces, ``‖Q_Uᵀ Q_V‖_F²`` (sum of squared cosines of principal angles).

    Between 0 (orthogonal subspaces) and ``min(rank U, rank V)`` (one subspace contains the other);
    invariant to any invertible mixing of the columns of U or of V (in float32: any well-conditioned
    one; Gram-Schmidt loses directions of a badly conditioned input). A diagnostic, not a loss.

    Args:
      U: ``(d, k)``.
      V: ``(d, m)``.

    Returns:
      scalar.
    """
    if U.ndim != 2 or V.ndim != 2 or U.shape[0] != V.shape[0]:
        raise ValueError(f"orthogonal.subspace_overlap: need U (d, k) and V (d, m); got {U.shape}, {V.shape}")
    return jnp.sum((gram_schmidt(U).T @ gram_schmidt(V)) ** 2)
