"""The interface methods read through: embed_inputs, site_shapes/site_axes, param_axes (Llama family
and T5 v1.0 / gated v1.1)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcl.models import Llama, LlamaConfig, t5

VOCABULARY = {"layers", "embed", "q_heads", "kv_heads", "mlp", "vocab", "relpos", "heads"}
LLAMA = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=6, biases=("q", "k", "v"))
T5_SIZES = dict(vocab_size=40, d_model=16, d_kv=6, d_ff=24, num_layers=2, num_decoder_layers=3, num_heads=4)

MODELS = {
    "llama_untied": lambda: Llama(LLAMA, rngs=nnx.Rngs(0)),
    "llama_tied": lambda: Llama(LlamaConfig(**{**LLAMA.__dict__, "tie_word_embeddings": True}), rngs=nnx.Rngs(0)),
    "t5_v1.0": lambda: t5.T5(t5.T5Config(**T5_SIZES), rngs=nnx.Rngs(0)),
    "t5_v1.1": lambda: t5.T5(t5.T5Config(**T5_SIZES, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                             rngs=nnx.Rngs(0)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


def _is_axes(x):
    return isinstance(x, tuple)


def _axis_sizes(model) -> dict:
    """{axis name: set of the sizes of the dimensions it names}."""
    state = nnx.to_pure_dict(nnx.state(model))
    sizes = {}
    for array, names in zip(jax.tree.leaves(state), jax.tree.leaves(model.param_axes(), is_leaf=_is_axes)):
        assert len(names) == array.ndim and set(names) <= VOCABULARY
        for name, size in zip(names, array.shape):
            sizes.setdefault(name, set()).add(size)
    return sizes


def test_param_axes_name_every_dimension_consistently(model):
    axes = model.param_axes()
    state = nnx.to_pure_dict(nnx.state(model))
    assert jax.tree.structure(state) == jax.tree.structure(jax.tree.map(lambda a: 0, axes, is_leaf=_is_axes))
    sizes = _axis_sizes(model)
    # an axis name is one size across the model (so GQA's q_heads and kv_heads cannot be mixed up);
    # only T5's encoder and decoder stacks differ in depth
    assert all(len(s) == 1 for name, s in sizes.items() if name != "layers"), sizes
    layer_leaves = [names for path, names in jax.tree_util.tree_leaves_with_path(axes, is_leaf=_is_axes)
                    if any(getattr(k, "key", None) == "layers" for k in path)]
    assert layer_leaves and all(names[0] == "layers" for names in layer_leaves)


def test_site_axes_match_site_shapes(model):
    shapes, axes, sizes = model.site_shapes(), model.site_axes(), _axis_sizes(model)
    assert set(shapes) == set(axes)
    for site, (inp, out) in axes.items():
        assert {shapes[site][1]} == sizes[inp] and {shapes[site][2]} == sizes[out]
    if isinstance(model, Llama):
        assert axes["attn.q"] == ("embed", "q_heads") and axes["attn.k"] == ("embed", "kv_heads")
        assert axes["attn.o"] == ("q_heads", "embed") and axes["mlp.down"] == ("mlp", "embed")
        assert axes["mlp.gate"] == ("embed", "mlp")
    else:
        assert axes["decoder.cross_attn.v"] == ("embed", "kv_heads") and axes["encoder.mlp.wo"] == ("mlp", "embed")
        assert axes["encoder.self_attn.o"] == ("q_heads", "embed")


def test_site_weights_are_the_stored_weights(model):
    weights, shapes = model.site_weights(), model.site_shapes()
    assert {site: w.shape for site, w in weights.items()} == shapes
    if isinstance(model, Llama):
        stored = {"attn.q": model.layers.q, "mlp.down": model.layers.down}
    else:
        stored = {"encoder.self_attn.v": model.encoder.layers.self_attn_v, "decoder.cross_attn.q": model.decoder.layers.cross_attn_q}
    for site, param in stored.items():
        np.testing.assert_array_equal(weights[site], param[...])
    for a in weights:  # no site reads another's weight (random init: every weight differs)
        for b in weights:
            if a < b and weights[a].shape == weights[b].shape:
                assert not np.array_equal(weights[a], weights[b]), (a, b)


def test_embed_inputs(model):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 5)))
    emb = np.asarray(model.embed_inputs(ids))
    table = model.shared[...] if model.is_encoder_decoder else model.embed[...]
    assert emb.shape == (2, 5, 16) and emb.dtype == table.dtype
    np.testing.assert_array_equal(emb, np.asarray(table)[np.asarray(ids)])
