"""The bottleneck-adapter kernels (OA-Adapter's math): soft threshold, bank output, orthogonality."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from jaxcl.kernels import bottleneck


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_soft_threshold_gives_exact_zeros_below_tau_and_a_gradient_to_tau(seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=32).astype(np.float32)
    tau = np.float32(abs(rng.normal()) * 0.8)
    w = rng.normal(size=32).astype(np.float32)
    gamma = np.asarray(bottleneck.soft_threshold(jnp.asarray(g), jnp.asarray(tau)))
    off = np.abs(g) <= tau
    assert np.all(gamma[off] == 0.0)
    np.testing.assert_allclose(gamma[~off], np.sign(g[~off]) * (np.abs(g[~off]) - tau), rtol=1e-6, atol=1e-7)
    d_tau, d_g = jax.grad(lambda t, gg: jnp.sum(w * bottleneck.soft_threshold(gg, t)), argnums=(0, 1))(
        jnp.asarray(tau), jnp.asarray(g))
    np.testing.assert_allclose(d_tau, -np.sum(np.sign(g[~off]) * w[~off]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(d_g), np.where(off, 0.0, w), rtol=1e-6)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_a_negative_threshold_acts_as_zero_and_never_amplifies(seed):
    rng = np.random.default_rng(seed)
    g = jnp.asarray(rng.normal(size=16), jnp.float32)
    tau = -jnp.float32(abs(rng.normal()) + 0.1)
    np.testing.assert_array_equal(bottleneck.soft_threshold(g, tau), bottleneck.soft_threshold(g, 0.0))
    assert np.all(np.abs(np.asarray(bottleneck.soft_threshold(g, tau))) <= np.abs(np.asarray(g)))
    # at τ = 0 (and below) the threshold still gets the gradient of the formula: L1 can raise it
    w = jnp.asarray(rng.normal(size=16), jnp.float32)
    for t in (jnp.float32(0.0), tau):
        d_tau = jax.grad(lambda tt: jnp.sum(w * bottleneck.soft_threshold(g, tt)))(t)
        np.testing.assert_allclose(d_tau, -np.sum(np.sign(np.asarray(g)) * np.asarray(w)), rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(tasks=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_bank_output_is_the_sum_of_each_adapter_output(tasks, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32)
    w1 = jnp.asarray(rng.normal(size=(tasks, 4, 6)), jnp.float32)
    gamma = jnp.asarray(rng.normal(size=(tasks, 4)) * (rng.random((tasks, 4)) > 0.3), jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(tasks, 5, 4)), jnp.float32)
    expected = sum(np.asarray(x) @ np.asarray(w1[t]).T * np.asarray(gamma[t]) @ np.asarray(w2[t]).T
                   for t in range(tasks))
    np.testing.assert_allclose(bottleneck.adapter_output(x, w1, gamma, w2), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bottleneck.adapter_output(x, w1[0], gamma[0], w2[0]),
                               np.asarray(x) @ np.asarray(w1[0]).T * np.asarray(gamma[0]) @ np.asarray(w2[0]).T,
                               rtol=1e-4, atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(tasks=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_orthogonality_penalty_counts_active_past_columns_only(tasks, seed):
    rng = np.random.default_rng(seed)
    past_w2 = rng.normal(size=(tasks, 6, 4))
    past_gamma = rng.normal(size=(tasks, 4)) * (rng.random((tasks, 4)) > 0.4)
    w2 = rng.normal(size=(6, 4))
    expected = sum(np.sum((past_w2[t][:, past_gamma[t] != 0].T @ w2) ** 2) for t in range(tasks))
    got = bottleneck.orthogonality_penalty(jnp.asarray(past_w2, jnp.float32), jnp.asarray(past_gamma, jnp.float32),
                                           jnp.asarray(w2, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    columns = np.asarray(bottleneck.active_columns(jnp.asarray(past_w2), jnp.asarray(past_gamma)))
    np.testing.assert_allclose(np.sum((columns.T @ w2) ** 2), expected, rtol=1e-4, atol=1e-5)
