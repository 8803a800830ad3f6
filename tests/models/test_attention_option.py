"""The models' ``attention`` option (causal attention over row lengths, the form cuDNN flash attention
takes on GPU) computes what the default boolean-mask attention computes at every real token, for
left- and right-padded Llama batches (also with a sliding window) and right-padded T5 batches; and ``remat`` policies by name give
the gradients of the plain forward. (On CPU the length path runs with ``implementation="xla"``.)"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tiny_cl import tiny_llama, tiny_t5


def _padded(rng, batch: int, seq: int, left: bool):
    lengths = rng.integers(1, seq + 1, batch)
    mask = np.arange(seq)[None] < lengths[:, None]
    return (mask[:, ::-1] if left else mask).astype(np.int32)


def _jitted(model, fn):
    """``fn(model, *args)`` jitted over the model's state, with ``attention`` static."""
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnames="attention")
    def run(state, *args, attention):
        m = nnx.merge(graphdef, state)
        m.attention = attention
        return fn(m, *args)
    return lambda *args, attention: np.asarray(run(state, *args, attention=attention))


@pytest.mark.parametrize("left, window", [(False, None), (True, None), (True, 3)])
def test_llama_length_attention_matches_the_mask(left, window):
    model = tiny_llama(64)
    model.config = dataclasses.replace(model.config, sliding_window=window)
    hidden = _jitted(model, lambda m, ids, mask: m.hidden(ids, mask))
    rng = np.random.default_rng(int(left))
    batch, seq = 4, 13
    for _ in range(3):
        ids = rng.integers(4, 64, (batch, seq)).astype(np.int32)
        mask = _padded(rng, batch, seq, left)
        real = mask.astype(bool)
        np.testing.assert_allclose(hidden(ids, mask, attention="xla")[real], hidden(ids, mask, attention=None)[real],
                                   atol=1e-5, rtol=1e-5)


def test_t5_length_attention_matches_the_masks():
    forward = _jitted(tiny_t5(64), lambda m, ids, src_mask, dec, tgt_mask: m(ids, src_mask, dec, tgt_mask))
    rng = np.random.default_rng(2)
    batch, src, tgt = 4, 11, 6
    for _ in range(3):
        ids = rng.integers(2, 64, (batch, src)).astype(np.int32)
        dec = rng.integers(2, 64, (batch, tgt)).astype(np.int32)
        src_mask, tgt_mask = _padded(rng, batch, src, False), _padded(rng, batch, tgt, False)
        real = tgt_mask.astype(bool)
        np.testing.assert_allclose(forward(ids, src_mask, dec, tgt_mask, attention="xla")[real],
                                   forward(ids, src_mask, dec, tgt_mask, attention=None)[real], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("remat", [True, "dots_with_no_batch_dims_saveable"])
def test_remat_policies_keep_the_gradients(remat):
    graphdef, state = nnx.split(tiny_llama(64))
    ids = np.random.default_rng(3).integers(4, 64, (2, 9)).astype(np.int32)

    @functools.partial(jax.jit, static_argnames="remat")
    def grads(state, remat):
        def loss(state):
            m = nnx.merge(graphdef, state)
            m.remat = remat
            return jnp.mean(m(ids) ** 2)
        return jax.grad(loss)(state)

    for g, e in zip(jax.tree.leaves(grads(state, remat)), jax.tree.leaves(grads(state, False))):
        np.testing.assert_allclose(g, e, atol=1e-6, rtol=1e-5)
