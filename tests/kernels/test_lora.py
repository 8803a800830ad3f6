"""Property tests of jaxcl.kernels.lora."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcl.kernels import lora

SEEDS = st.integers(0, 2**32 - 1)
D_IN = st.sampled_from((4, 24))
D_OUT = st.sampled_from((3, 16))
RANK = st.sampled_from((1, 8))
ALPHA = st.floats(0.5, 64.0)
# Jitted once per shape (alpha and rank traced): cheaper than eager compiles, and proves they jit.
apply = jax.jit(lora.apply)
merge = jax.jit(lora.merge)


def _trained(seed, d_in, d_out, rank):
    """An adapter with non-zero b, as after some training."""
    params = lora.init(jax.random.key(seed), d_in, d_out, rank)
    b = np.random.default_rng(seed).standard_normal((d_out, rank))
    return {"a": params["a"], "b": jnp.asarray(b, jnp.float32)}


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_init_matches_torch_kaiming_uniform_bound():
    import torch

    d_in, rank = 512, 64
    params = lora.init(jax.random.key(0), d_in, 40, rank)
    assert params["a"].shape == (rank, d_in) and params["b"].shape == (40, rank)
    assert params["a"].dtype == jnp.float32
    np.testing.assert_array_equal(params["b"], 0.0)
    # torch's kaiming_uniform_(a=sqrt(5)) bound for this fan-in, from torch's own gain formula.
    bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / d_in)
    a = np.asarray(params["a"])
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.99 * bound  # fills the interval ...
    np.testing.assert_allclose(a.std(), bound / math.sqrt(3.0), rtol=0.02)  # ... uniformly
    assert abs(a.mean()) < 4 * bound / math.sqrt(3.0 * a.size)


@settings(max_examples=8, deadline=None)
@given(d_in=D_IN, d_out=D_OUT, rank=RANK, alpha=ALPHA, seed=SEEDS)
def test_merge_equals_base_plus_apply(d_in, d_out, rank, alpha, seed):
    params = _trained(seed, d_in, d_out, rank)
    w = _normal(seed + 1, (d_in, d_out))
    x = _normal(seed + 2, (3, 2, d_in))
    merged = merge(w, params, alpha, rank)
    assert merged.shape == w.shape and merged.dtype == w.dtype
    out = apply(params, x, alpha, rank)
    assert out.shape == (3, 2, d_out)
    np.testing.assert_allclose(x @ merged, x @ w + out, rtol=1e-4, atol=1e-4)
    # and apply is the textbook formula
    ref = (alpha / rank) * np.asarray(x) @ np.asarray(params["a"]).T @ np.asarray(params["b"]).T
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=8, deadline=None)
@given(d_in=D_IN, d_out=D_OUT, rank=RANK, alpha=ALPHA, n_past=st.integers(0, 3), seed=SEEDS)
def test_concat_then_apply_is_sum_of_applies(d_in, d_out, rank, alpha, n_past, seed):
    adapters = [_trained(seed + i, d_in, d_out, rank) for i in range(n_past + 1)]
    x = _normal(seed + 100, (3, d_in))
    stacked = None
    for p in adapters:
        stacked = lora.concat(stacked, p)
    assert stacked["a"].shape == ((n_past + 1) * rank, d_in)
    assert stacked["b"].shape == (d_out, (n_past + 1) * rank)
    total = sum(apply(p, x, alpha, rank) for p in adapters)
    np.testing.assert_allclose(apply(stacked, x, alpha, rank), total, rtol=1e-4, atol=1e-4)
    empty = {"a": jnp.zeros((0, d_in)), "b": jnp.zeros((d_out, 0))}
    np.testing.assert_array_equal(lora.concat(empty, adapters[0])["a"], adapters[0]["a"])


@settings(max_examples=8, deadline=None)
@given(d_in=D_IN, d_out=D_OUT, rank=RANK, slots=st.integers(1, 3), weighted=st.booleans(), seed=SEEDS)
def test_apply_bank_is_the_per_example_weighted_sum_of_applies(d_in, d_out, rank, slots, weighted, seed):
    adapters = [_trained(seed + i, d_in, d_out, rank) for i in range(slots)]
    a = jnp.stack([p["a"] for p in adapters])
    b = jnp.stack([p["b"] for p in adapters])
    x = _normal(seed + 100, (2, 3, d_in))
    weights = _normal(seed + 200, (2, slots)) if weighted else None
    out = jax.jit(lora.apply_bank, static_argnums=(3, 4))(a, b, x, 16.0, rank, weights)
    for row in range(2):
        expected = sum((1.0 if weights is None else float(weights[row, t])) * apply(adapters[t], x[row], 16.0, rank)
                       for t in range(slots))
        np.testing.assert_allclose(out[row], expected, rtol=1e-4, atol=1e-4)


def test_apply_computes_in_input_dtype():
    params = _trained(0, 16, 8, 4)
    x = _normal(1, (2, 16))
    out16 = lora.apply(params, x.astype(jnp.bfloat16), 16.0, 4)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(out16.astype(jnp.float32), lora.apply(params, x, 16.0, 4), rtol=0.05, atol=0.05)
    w16 = jnp.ones((16, 8), jnp.bfloat16)
    assert lora.merge(w16, params, 16.0, 4).dtype == jnp.bfloat16


def test_dropout_zeroes_or_rescales_inputs():
    d, rate = 64, 0.3
    identity = {"a": jnp.eye(d), "b": jnp.eye(d)}  # with alpha = rank the adapter returns dropout(x)
    x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, (200, d)), jnp.float32)
    out = np.asarray(lora.apply(identity, x, d, d, dropout_key=jax.random.key(1), rate=rate))
    kept = out != 0
    np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-5)
    n = x.size
    assert abs(kept.sum() - n * (1 - rate)) < 4 * math.sqrt(n * rate * (1 - rate))
    np.testing.assert_array_equal(lora.apply(identity, x, d, d, dropout_key=None, rate=rate), x)
    np.testing.assert_array_equal(lora.apply(identity, x, d, d, dropout_key=jax.random.key(1), rate=0.0), x)


def test_bad_inputs_raise():
    p = _trained(0, 4, 3, 2)
    q = _trained(1, 5, 3, 2)
    with pytest.raises(ValueError, match="share d_in and d_out"):
        lora.concat(p, q)
    with pytest.raises(ValueError, match=r"\(d_in, d_out\)"):
        lora.merge(jnp.zeros((3, 4)), p, 8.0, 2)
    with pytest.raises(ValueError, match=r"lora.dropout: rate must be in \[0, 1\)"):
        lora.apply(p, jnp.ones((1, 4)), 8.0, 2, dropout_key=jax.random.key(0), rate=1.0)
