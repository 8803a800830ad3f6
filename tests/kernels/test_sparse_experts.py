"""Property tests of jaxcl.kernels.sparse_experts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcl.kernels import sparse_experts as se

SEEDS = st.integers(0, 2**32 - 1)
LOG_ALPHA = st.lists(st.floats(-8.0, 8.0), min_size=6, max_size=6)


@settings(max_examples=15, deadline=None)
@given(log_alpha=LOG_ALPHA, seed=SEEDS)
def test_gates_lie_in_unit_interval_and_eval_is_deterministic(log_alpha, seed):
    la = jnp.asarray(log_alpha, jnp.float32)
    k1, k2 = jax.random.split(jax.random.key(seed))
    train = np.asarray(se.hard_concrete(k1, la))
    assert train.shape == la.shape and np.all((train >= 0) & (train <= 1))
    ev = np.asarray(se.hard_concrete(k1, la, train=False))
    np.testing.assert_array_equal(ev, se.hard_concrete(k2, la, train=False))
    np.testing.assert_array_equal(ev, se.hard_concrete(None, la, train=False))
    expected = np.clip(1 / (1 + np.exp(-np.asarray(log_alpha, np.float64))) * 1.2 - 0.1, 0, 1)
    np.testing.assert_allclose(ev, expected, atol=1e-6)


def test_eval_gate_is_exactly_zero_or_one_far_from_the_boundary():
    ev = se.hard_concrete(None, jnp.array([-5.0, 5.0]), train=False)
    np.testing.assert_array_equal(ev, [0.0, 1.0])


def test_expected_l0_matches_monte_carlo():
    beta, zeta, gamma = 2 / 3, 1.1, -0.1
    log_alpha = jnp.linspace(-3.0, 3.0, 7)
    n = 20_000
    z = np.asarray(se.hard_concrete(jax.random.key(0), jnp.broadcast_to(log_alpha, (n, 7)), beta, zeta, gamma))
    p_nonzero = np.asarray(se.expected_l0(log_alpha, beta, zeta, gamma))
    stderr = np.sqrt(p_nonzero * (1 - p_nonzero) / n)
    assert np.all(np.abs((z > 0).mean(0) - p_nonzero) < 4 * stderr)
    # Same derivation for the upper end: P(z == 1) = sigmoid(log_alpha - beta * log((1 - gamma) / (zeta - 1))).
    p_one = 1 / (1 + np.exp(-(np.asarray(log_alpha) - beta * math.log((1 - gamma) / (zeta - 1)))))
    assert np.all(np.abs((z == 1).mean(0) - p_one) < 4 * np.sqrt(p_one * (1 - p_one) / n))


def test_train_gates_are_differentiable_in_log_alpha():
    grad = jax.grad(lambda la: se.hard_concrete(jax.random.key(1), la).sum())(jnp.zeros(1000))
    assert np.all(np.isfinite(grad)) and np.all(grad >= 0) and np.any(grad > 0)
    grad_l0 = jax.grad(lambda la: se.expected_l0(la).sum())(jnp.zeros(3))
    assert np.all(grad_l0 > 0)


@settings(max_examples=10, deadline=None)
@given(n_experts=st.integers(1, 8), batch=st.integers(1, 4), seed=SEEDS)
def test_interpolate_is_weighted_sum(n_experts, batch, seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((n_experts, 3, 5)).astype(np.float32)
    w = rng.random(n_experts).astype(np.float32)
    wb = rng.random((batch, n_experts)).astype(np.float32)
    manual = sum(w[i] * masks[i] for i in range(n_experts))
    np.testing.assert_allclose(se.interpolate(jnp.asarray(masks), jnp.asarray(w)), manual, rtol=1e-5, atol=1e-6)
    manual = np.stack([sum(wb[b, i] * masks[i] for i in range(n_experts)) for b in range(batch)])
    np.testing.assert_allclose(se.interpolate(jnp.asarray(masks), jnp.asarray(wb)), manual, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(E,\) or \(B, E\)"):
        se.interpolate(jnp.asarray(masks), jnp.ones(n_experts + 1))


def test_init_log_alpha():
    la = np.asarray(se.init_log_alpha(jax.random.key(0), (8, 64, 64)))
    assert la.shape == (8, 64, 64) and la.dtype == np.float32
    np.testing.assert_allclose(la.std(), 0.5, rtol=0.02)
    wide = np.asarray(se.init_log_alpha(jax.random.key(1), (10_000,), std=10.0))
    assert wide.min() == pytest.approx(math.log(0.01)) and wide.max() == pytest.approx(math.log(100.0))
