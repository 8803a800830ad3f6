"""Recursive least squares (closed-form ridge regression, updated block by block).

The state carries ``R = (ΦᵀΦ + γI)⁻¹`` and ``W = R ΦᵀY`` for all rows seen so far. Each block update
is the Woodbury identity, so after any split of the data into blocks (of any sizes, in any order) the
state equals the joint ridge solution on everything seen — the property Any-SSR's router relies on to
learn task by task without replay.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Matmuls here feed a recursion, so TF32/bf16 passes (the GPU/TPU default) would accumulate error.
_HIGHEST = jax.lax.Precision.HIGHEST


class RLSState(NamedTuple):
    """Ridge-regression state.

    Attributes:
      R: ``(dim, dim)`` inverse regularised autocorrelation ``(ΦᵀΦ + γI)⁻¹`` (symmetric).
      W: ``(dim, n_out)`` ridge weights ``R ΦᵀY``.
    """

    R: jax.Array
    W: jax.Array


def init(dim: int, n_out: int, gamma: float, dtype=None) -> RLSState:
    """Creates the state of a ridge regression that has seen no data.

    Args:
      dim: feature dimension.
      n_out: number of output columns (0 is allowed; see :func:`add_outputs`).
      gamma: ridge strength γ > 0.
      dtype: dtype of R and W; by default JAX's default float dtype (float32, or float64 under
        ``jax_enable_x64``), as ``jnp.zeros`` would give.

    Returns:
      ``RLSState(R=I/γ, W=0)`` with shapes ``(dim, dim)`` and ``(dim, n_out)``.
    """
    if dim <= 0 or n_out < 0:
        raise ValueError(f"rls.init: expected dim > 0 and n_out >= 0, got {dim=}, {n_out=}")
    if not gamma > 0:
        raise ValueError(f"rls.init: gamma must be > 0, got {gamma}")
    if dtype is None:  # read at call time, so a later jax_enable_x64 counts
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    return RLSState(R=jnp.eye(dim, dtype=dtype) / gamma, W=jnp.zeros((dim, n_out), dtype))


def _check_block(state: RLSState, x: jax.Array, y: jax.Array, name: str) -> None:
    dim, n_out = state.W.shape
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"rls.{name}: X must be (n, {dim}), got {x.shape}")
    if y.ndim != 2 or y.shape != (x.shape[0], n_out):
        raise ValueError(f"rls.{name}: Y must be (n, {n_out}) with n = X.shape[0] = {x.shape[0]}, got {y.shape}")


def update(state: RLSState, X: jax.Array, Y: jax.Array) -> RLSState:
    """Adds a block of rows to the regression (block Woodbury update).

    ``R ← R − R Xᵀ (I + X R Xᵀ)⁻¹ X R`` and then ``W ← W + R Xᵀ (Y − X W)`` with the new R. The inverse
    is never formed: the n×n system is solved by Cholesky (it is symmetric positive definite). R is
    re-symmetrised so rounding cannot make it drift away from symmetry over many updates. Zero rows in
    both X and Y contribute nothing (a block of only zero rows returns the state unchanged), which
    :func:`update_blocks` uses for padding.

    Args:
      state: current state, R ``(dim, dim)``, W ``(dim, n_out)``.
      X: features ``(n, dim)``.
      Y: targets ``(n, n_out)``.

    Returns:
      the updated state (same shapes and dtypes).
    """
    R, W = state
    X, Y = jnp.asarray(X, R.dtype), jnp.asarray(Y, W.dtype)
    _check_block(state, X, Y, "update")
    if X.shape[0] == 0:
        return state
    XR = jnp.matmul(X, R, precision=_HIGHEST)  # (n, dim) = X R
    S = jnp.eye(X.shape[0], dtype=R.dtype) + jnp.matmul(XR, X.T, precision=_HIGHEST)  # I + X R Xᵀ
    K = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(S, lower=True), XR)  # S⁻¹ X R
    R = R - jnp.matmul(XR.T, K, precision=_HIGHEST)  # R symmetric, so (X R)ᵀ = R Xᵀ
    R = 0.5 * (R + R.T)
    residual = Y - jnp.matmul(X, W, precision=_HIGHEST)
    W = W + jnp.matmul(R, jnp.matmul(X.T, residual, precision=_HIGHEST), precision=_HIGHEST)
    return RLSState(R=R, W=W)


# Jitted so the scan compiles once per shape rather than on every eager call.
@functools.partial(jax.jit, static_argnames="block_size")
def update_blocks(state: RLSState, X: jax.Array, Y: jax.Array, block_size: int) -> RLSState:
    """Feeds a long dataset through :func:`update` in fixed-size blocks with ``lax.scan``.

    The last block is padded with zero rows (which change nothing), so every step has the same shape
    and the update compiles once however many blocks there are (the function is jitted with
    ``block_size`` static).

    Args:
      state: current state, R ``(dim, dim)``, W ``(dim, n_out)``.
      X: features ``(n, dim)``.
      Y: targets ``(n, n_out)``.
      block_size: rows per Woodbury step (a Python int > 0); larger blocks mean fewer sequential
        steps but a bigger ``(block_size, block_size)`` solve.

    Returns:
      the state after all n rows.
    """
    X, Y = jnp.asarray(X, state.R.dtype), jnp.asarray(Y, state.W.dtype)
    _check_block(state, X, Y, "update_blocks")
    if int(block_size) != block_size or block_size <= 0:
        raise ValueError(f"rls.update_blocks: block_size must be a positive int, got {block_size!r}")
    n = X.shape[0]
    n_blocks = -(-n // block_size)
    pad = n_blocks * block_size - n
    X = jnp.pad(X, ((0, pad), (0, 0))).reshape(n_blocks, block_size, X.shape[1])
    Y = jnp.pad(Y, ((0, pad), (0, 0))).reshape(n_blocks, block_size, Y.shape[1])

    def step(carry, block):
        return update(carry, *block), None

    state, _ = jax.lax.scan(step, state, (X, Y))
    return state


def add_outputs(state: RLSState, n: int) -> RLSState:
    """Appends ``n`` zero output columns (e.g. a new task's one-hot column).

    Zero columns are the exact ridge solution for rows seen so far when their targets in the new
    columns are 0, so later updates keep ``W`` equal to the joint solution; old columns are untouched.

    Args:
      state: R ``(dim, dim)``, W ``(dim, n_out)``.
      n: number of columns to add (Python int >= 0).

    Returns:
      state with W ``(dim, n_out + n)``.
    """
    if n < 0:
        raise ValueError(f"rls.add_outputs: n must be >= 0, got {n}")
    return RLSState(R=state.R, W=jnp.pad(state.W, ((0, 0), (0, n))))


def predict(state: RLSState, X: jax.Array) -> jax.Array:
    """Ridge predictions ``X @ W``.

    Args:
      state: R ``(dim, dim)``, W ``(dim, n_out)``.
      X: features ``(..., dim)``.

    Returns:
      ``(..., n_out)``.
    """
    return jnp.matmul(X.astype(state.W.dtype), state.W, precision=_HIGHEST)
