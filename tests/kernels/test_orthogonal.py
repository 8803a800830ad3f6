"""Property tests of jaxcl.kernels.orthogonal."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jaxcl.kernels import orthogonal

SEEDS = st.integers(0, 2**32 - 1)
# Shapes come from small menus: each new shape compiles the Gram-Schmidt loop once.
DIMS = st.sampled_from((6, 40))
RANKS = st.sampled_from((1, 5))


def _conditioned(rng, d, k, max_cond):
    """A random (d, k) matrix whose singular values lie in [1, max_cond]."""
    u, _ = np.linalg.qr(rng.standard_normal((d, k)))
    v, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return (u * rng.uniform(1.0, max_cond, size=k)) @ v.T


@settings(max_examples=10, deadline=None)
@given(d=DIMS, k=RANKS, seed=SEEDS)
def test_full_rank_columns_become_orthonormal_float32(d, k, seed):
    rng = np.random.default_rng(seed)
    v = _conditioned(rng, d, min(k, d), max_cond=100.0).astype(np.float32)
    q = np.asarray(orthogonal.gram_schmidt(jnp.asarray(v)), np.float64)
    # MGS loses orthogonality like eps * cond(V) ~ 1e-5 here (worst seen over 1200 draws: 4.9e-6).
    np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=5e-5)
    np.testing.assert_allclose(q @ (q.T @ v), v, atol=1e-4 * np.abs(v).max())  # same span


@settings(max_examples=8, deadline=None)
@given(d=DIMS, k=RANKS, scale=st.floats(1e-6, 1e6), seed=SEEDS)
def test_full_rank_columns_become_orthonormal_float64(d, k, scale, seed, x64):
    rng = np.random.default_rng(seed)
    v = scale * rng.standard_normal((d, min(k, d)))
    with x64():
        q = np.asarray(orthogonal.gram_schmidt(jnp.asarray(v)))
    assert q.dtype == np.float64
    np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=1e-10)
    # MGS is triangular: column j of Q spans the same flag as the first j columns of V.
    r = q.T @ v
    np.testing.assert_allclose(np.tril(r, -1), 0.0, atol=1e-8 * scale)
    assert np.all(np.diag(r) > 0)


@st.composite
def with_dependent_columns(draw):
    """Columns that are new random directions or combinations (incl. zero) of earlier columns."""
    d = draw(st.sampled_from((16, 40)))
    kinds = draw(st.lists(st.sampled_from(["new", "combo", "zero", "copy"]), min_size=7, max_size=7))
    return d, ["new"] + kinds, draw(SEEDS)


@settings(max_examples=12, deadline=None)
@given(case=with_dependent_columns())
def test_dependent_columns_come_out_exactly_zero(case):
    d, kinds, seed = case
    rng = np.random.default_rng(seed)
    cols = []
    for kind in kinds:
        if kind == "new":
            cols.append(rng.standard_normal(d))
        elif kind == "zero":
            cols.append(np.zeros(d))
        elif kind == "copy":
            cols.append(rng.uniform(-10, 10) * cols[rng.integers(len(cols))])
        else:
            cols.append(np.stack(cols, 1) @ rng.standard_normal(len(cols)))
    v = np.stack(cols, 1).astype(np.float32)
    q = np.asarray(orthogonal.gram_schmidt(jnp.asarray(v)))
    independent = np.array([kind == "new" for kind in kinds])
    assert np.all(q[:, ~independent] == 0.0)  # exactly zero, not merely small
    kept = q[:, independent].astype(np.float64)
    np.testing.assert_allclose(kept.T @ kept, np.eye(kept.shape[1]), atol=1e-5)
    np.testing.assert_allclose(q @ (q.T @ v), v, atol=1e-4 * np.abs(v).max())


def test_gram_schmidt_tolerance_is_relative_to_each_column():
    # A tiny but independent column stays; a near-duplicate of a huge column goes.
    v = np.array([[1e4, 1e4 * (1 + 1e-9), 0.0], [0.0, 1e-3, 0.0], [0.0, 0.0, 1e-6]])
    q = np.asarray(orthogonal.gram_schmidt(jnp.asarray(v, jnp.float32)))
    np.testing.assert_allclose(np.abs(q[:, 0]), [1, 0, 0], atol=1e-6)
    assert np.all(q[:, 1] == 0.0)
    np.testing.assert_allclose(np.abs(q[:, 2]), [0, 0, 1], atol=1e-6)
    with pytest.raises(ValueError, match=r"\(d, k\)"):
        orthogonal.gram_schmidt(jnp.ones(3))


@settings(max_examples=10, deadline=None)
@given(d=DIMS, k=RANKS, n=st.sampled_from((1, 5)), seed=SEEDS)
def test_project_out_is_an_orthogonal_projection(d, k, n, seed):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((d, k))
    v[:, -1] = v[:, 0] * 3.0  # a dependent column gives a zero column in Q
    q = orthogonal.gram_schmidt(jnp.asarray(v, jnp.float32))
    g = jnp.asarray(rng.standard_normal((d, n)), jnp.float32)
    p = orthogonal.project_out(g, q)
    scale = float(jnp.abs(g).max())
    np.testing.assert_allclose(q.T @ p, 0.0, atol=1e-5 * scale)  # orthogonal to Q
    np.testing.assert_allclose(orthogonal.project_out(p, q), p, atol=1e-5 * scale)  # idempotent
    removed = np.asarray(g - p, np.float64)
    np.testing.assert_allclose(v @ np.linalg.lstsq(v, removed, rcond=None)[0], removed, atol=1e-4 * scale)  # in span(V)
    np.testing.assert_allclose(orthogonal.project_out(g[:, 0], q), p[:, 0], atol=1e-6 * scale)  # vectors too


@settings(max_examples=10, deadline=None)
@given(r_past=st.sampled_from((0, 1, 5, 12)), r_new=st.sampled_from((1, 8)), d=st.sampled_from((8, 32)), seed=SEEDS)
def test_olora_penalty_matches_reference(r_past, r_new, d, seed):
    rng = np.random.default_rng(seed)
    past, new = rng.standard_normal((r_past, d)), rng.standard_normal((r_new, d))
    got = orthogonal.olora_penalty(jnp.asarray(past, jnp.float32), jnp.asarray(new, jnp.float32))
    ref = sum(abs(float(past[i] @ new[j])) for i in range(r_past) for j in range(r_new))
    np.testing.assert_allclose(float(got), ref, rtol=1e-5, atol=1e-5)
    swapped = orthogonal.olora_penalty(jnp.asarray(new, jnp.float32), jnp.asarray(past, jnp.float32))
    np.testing.assert_allclose(float(swapped), float(got), rtol=1e-6)


@settings(max_examples=8, deadline=None)
@given(r_past=st.sampled_from((1, 3, 8)), r_new=st.sampled_from((1, 8)), seed=SEEDS)
def test_olora_penalty_is_zero_for_orthogonal_rows(r_past, r_new, seed):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    mix_past, mix_new = rng.standard_normal((r_past, r_past)), rng.standard_normal((r_new, r_new))
    past = mix_past @ basis[:r_past]  # rows in one subspace ...
    new = mix_new @ basis[r_past : r_past + r_new]  # ... and in its orthogonal complement
    got = float(orthogonal.olora_penalty(jnp.asarray(past, jnp.float32), jnp.asarray(new, jnp.float32)))
    assert got <= 1e-5 * np.abs(past).max() * np.abs(new).max() * r_past * r_new
    # Add a past direction to a new row: the penalty sees exactly that shared part.
    overlap = orthogonal.olora_penalty(jnp.asarray(past, jnp.float32), jnp.asarray(past[:1] + new[:1], jnp.float32))
    np.testing.assert_allclose(float(overlap), np.abs(past @ past[0]).sum(), rtol=1e-4, atol=1e-5)


def _mixing(rng, n: int) -> np.ndarray:
    """A random invertible ``(n, n)`` column mixing with condition number at most 4: float32
    Gram-Schmidt loses directions of badly conditioned inputs (a Gaussian 10 x 10 mixing of a
    Gaussian mixing did: overlap 4.0 for 5 shared dimensions), which is float32, not the kernel."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q * rng.uniform(0.5, 2.0, n)


@settings(max_examples=8, deadline=None)
@given(k=RANKS, m=RANKS, seed=SEEDS)
@example(k=5, m=5, seed=432)  # the case that failed with unbounded Gaussian mixings
def test_subspace_overlap(k, m, seed):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    u = basis[:, :k] @ _mixing(rng, k)
    w = basis[:, k : k + m] @ _mixing(rng, m)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    np.testing.assert_allclose(float(orthogonal.subspace_overlap(f32(u), f32(u))), k, atol=1e-4)
    np.testing.assert_allclose(float(orthogonal.subspace_overlap(f32(u), f32(w))), 0.0, atol=1e-5)
    # One contains the other: overlap is the smaller dimension, whatever the (well-conditioned) mixing.
    both = np.concatenate([u, w], 1) @ _mixing(rng, k + m)
    np.testing.assert_allclose(float(orthogonal.subspace_overlap(f32(u), f32(both))), k, atol=1e-3)
