"""Property tests of jaxcl.kernels.sensitivity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcl.kernels import sensitivity

SEEDS = st.integers(0, 2**32 - 1)
SHAPES = st.sampled_from(((1,), (7,), (5, 6), (2, 3, 16)))
info_nce = jax.jit(sensitivity.info_nce)  # one compilation per shape
info_nce_grad = jax.jit(jax.grad(sensitivity.info_nce))


@settings(max_examples=20, deadline=None)
@given(shapes=st.lists(SHAPES, min_size=1, max_size=3), fraction=st.floats(0.0, 1.0), ties=st.booleans(), seed=SEEDS)
def test_topk_mask_keeps_the_asked_fraction_per_tensor(shapes, fraction, ties, seed):
    rng = np.random.default_rng(seed)
    # With ties=True scores take only 3 values, so the quantile rule alone could keep far too many.
    scores = {
        f"w{i}": jnp.asarray(rng.integers(0, 3, s) if ties else rng.standard_normal(s), jnp.float32)
        for i, s in enumerate(shapes)
    }
    masks = sensitivity.topk_mask(scores, fraction)
    assert jax.tree.structure(masks) == jax.tree.structure(scores)
    for name, s in scores.items():
        m, s = np.asarray(masks[name]), np.asarray(s)
        assert m.dtype == bool and m.shape == s.shape
        assert abs(m.sum() - fraction * s.size) <= 1  # the asked fraction, ± one entry
        if fraction > 0:
            assert m.sum() >= 1
        if m.any() and not m.all():
            assert s[m].min() >= s[~m].max()  # everything kept scores at least as high as anything dropped
    again = sensitivity.topk_mask(scores, fraction)
    for name in scores:
        np.testing.assert_array_equal(again[name], masks[name])  # ties broken deterministically


def test_topk_mask_rejects_bad_fraction():
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        sensitivity.topk_mask({"w": jnp.ones(3)}, 1.5)


def test_fisher_scores_is_mean_squared_gradient():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((4, 3)) for _ in range(5)]
    summed = {"w": jnp.asarray(sum(g**2 for g in grads), jnp.float32)}
    np.testing.assert_allclose(sensitivity.fisher_scores(summed, 5)["w"], np.mean(np.square(grads), 0), rtol=1e-6)
    with pytest.raises(ValueError, match="n must be > 0"):
        sensitivity.fisher_scores(summed, 0)


@pytest.mark.parametrize("keep_prob", [0.1, 0.5])
@pytest.mark.parametrize("rescale", [False, True])
def test_drop_gradients_masks_and_keeps_with_the_asked_probability(keep_prob, rescale):
    rng = np.random.default_rng(1)
    grads = {"a": jnp.asarray(rng.standard_normal((300, 200)) + 5.0, jnp.float32), "b": jnp.full((40_000,), 2.0)}
    mask = {"a": jnp.asarray(rng.random((300, 200)) < 0.3), "b": jnp.ones((40_000,), bool)}
    out = sensitivity.drop_gradients(jax.random.key(2), grads, mask, keep_prob, rescale=rescale)
    for name in grads:
        g, m, o = (np.asarray(t[name]) for t in (grads, mask, out))
        assert np.all(o[~m] == 0.0)  # outside the mask: exactly zero
        kept = o != 0
        expected = g[kept] / keep_prob if rescale else g[kept]
        np.testing.assert_allclose(o[kept], expected, rtol=1e-6)  # kept entries untouched (or rescaled)
        n = int(m.sum())
        sigma = math.sqrt(n * keep_prob * (1 - keep_prob))
        assert abs(kept.sum() - n * keep_prob) < 4 * sigma  # binomial(n, keep_prob), 4 sigma
    # each tensor draws its own pattern
    twins = sensitivity.drop_gradients(jax.random.key(3), [jnp.ones(1000)] * 2, [jnp.ones(1000, bool)] * 2, 0.5)
    assert not np.array_equal(twins[0], twins[1])


def _supcon_reference(z1, z2, labels, temperature):
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    lab = np.concatenate([labels, labels])
    losses = []
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        denom = np.log(sum(np.exp(z[i] @ z[a] / temperature) for a in others))
        pos = [p for p in others if lab[p] == lab[i]]
        losses.append(-np.mean([z[i] @ z[p] / temperature - denom for p in pos]))
    return np.mean(losses)


@settings(max_examples=10, deadline=None)
@given(batch=st.sampled_from((2, 6)), n_classes=st.integers(1, 6), temperature=st.floats(0.05, 1.0), seed=SEEDS)
def test_info_nce_matches_reference_and_its_lower_bound(batch, n_classes, temperature, seed):
    rng = np.random.default_rng(seed)
    z1, z2 = rng.standard_normal((2, batch, 8))
    labels = rng.integers(0, n_classes, batch)
    got = float(info_nce(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), jnp.asarray(labels), temperature))
    np.testing.assert_allclose(got, _supcon_reference(z1, z2, labels, temperature), rtol=2e-4, atol=2e-4)
    # Each anchor's positives share at most all of its softmax mass: loss >= mean log |P(i)|.
    both = np.concatenate([labels, labels])
    bound = np.mean([np.log(np.sum(both == c) - 1) for c in both])
    assert got >= bound - 1e-4
    # Inputs are L2-normalised: rescaling the embeddings changes nothing.
    scaled = info_nce(
        jnp.asarray(3 * z1, jnp.float32), jnp.asarray(0.5 * z2, jnp.float32), jnp.asarray(labels), temperature
    )
    np.testing.assert_allclose(float(scaled), got, rtol=1e-5)


@settings(max_examples=8, deadline=None)
@given(batch=st.sampled_from((4, 8)), n_classes=st.integers(2, 4), seed=SEEDS)
def test_info_nce_is_lowest_for_aligned_views(batch, n_classes, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(batch) % n_classes
    prototypes = np.linalg.qr(rng.standard_normal((32, n_classes)))[0].T  # orthonormal class directions
    aligned = jnp.asarray(prototypes[labels] + 1e-3 * rng.standard_normal((batch, 32)), jnp.float32)
    random_a, random_b = (jnp.asarray(rng.standard_normal((batch, 32)), jnp.float32) for _ in range(2))
    lab = jnp.asarray(labels)
    loss_aligned = float(info_nce(aligned, aligned, lab))
    loss_random = float(info_nce(random_a, random_b, lab))
    both = np.concatenate([labels, labels])
    bound = np.mean([np.log(np.sum(both == c) - 1) for c in both])
    assert loss_aligned < loss_random
    assert loss_aligned < bound + 1e-3  # views collapsed per class reach the minimum
    grads = info_nce_grad(random_a, random_b, lab)
    assert np.all(np.isfinite(grads)) and np.abs(grads).max() > 0
