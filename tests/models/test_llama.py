"""Llama: parity with transformers' LlamaForCausalLM, config mapping, adapter sites, remat."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import given, settings, strategies as st
from transformers import LlamaConfig as HFLlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxcl.models import Adapter, Llama, LlamaConfig, SiteHook, load_model
from jaxcl.models.llama import rope_inv_freq
from llama_parity import padded_batches, rel_err, torch_logits

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# With head_dim 16 and theta 1e4 the llama3 wavelengths (6.3, 20, 63, 199, ...) fall in all three
# bands: kept (< 64/4), interpolated, divided (> 64/1).
CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa_untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "tied": dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500.0),
    "llama3_head_dim": dict(num_key_value_heads=2, head_dim=16, rope_parameters=LLAMA3_ROPE),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, save_tiny_llama):
    """name -> (checkpoint dir, torch model)."""
    saved = {}
    for i, (name, overrides) in enumerate(CONFIGS.items()):
        directory = tmp_path_factory.mktemp(name)
        saved[name] = (directory, save_tiny_llama(directory, seed=i, **overrides))
    return saved


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_float32(checkpoints, name):
    directory, torch_model = checkpoints[name]
    model, _ = load_model(directory)
    forward = jax.jit(lambda m, ids, mask: m(ids, mask))
    for ids, mask, left in padded_batches():
        ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
        err = rel_err(ours, torch_logits(torch_model, ids, mask, left), mask)
        print(f"\n[parity float32] {name} {'left' if left else 'right'}-padded: "
              f"max|dlogits|/max|logits| = {err:.2e}")
        assert err <= 1e-5
        assert np.isfinite(ours).all()  # padding rows included


@pytest.mark.parametrize("name", ["gqa_untied", "tied"])
def test_bfloat16_close_to_float32_reference(checkpoints, name):
    directory, torch_model = checkpoints[name]
    model, _ = load_model(directory, dtype=jnp.bfloat16)
    assert model.layers.q[...].dtype == jnp.bfloat16
    for ids, mask, left in padded_batches(seed=1):
        ours = np.asarray(jax.jit(lambda m, i, k: m(i, k))(model, jnp.asarray(ids), jnp.asarray(mask)))
        assert ours.dtype == np.float32 and np.isfinite(ours).all()
        err = rel_err(ours, torch_logits(torch_model, ids, mask, left), mask)
        print(f"\n[parity bfloat16 vs float32 torch] {name}: max|dlogits|/max|logits| = {err:.2e}")
        assert err <= 5e-2


def test_hidden_prefix_layers_match_transformers_hidden_states(checkpoints):
    directory, torch_model = checkpoints["gqa_untied"]
    model, _ = load_model(directory)
    ids, mask, _ = padded_batches()[0]
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                          output_hidden_states=True).hidden_states[1].numpy()
    ours = np.asarray(jax.jit(lambda m: m.hidden(jnp.asarray(ids), jnp.asarray(mask), num_layers=1,
                                                 final_norm=False))(model))
    assert rel_err(ours, ref, mask) <= 1e-5
    full = jax.jit(lambda m: m.logits(m.hidden(jnp.asarray(ids), jnp.asarray(mask))))(model)
    np.testing.assert_allclose(full, jax.jit(lambda m: m(jnp.asarray(ids), jnp.asarray(mask)))(model),
                               rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(theta=st.sampled_from([500.0, 1e4, 5e5]), half_dim=st.integers(2, 64),
       factor=st.floats(1.5, 32.0), low=st.floats(0.5, 2.0), gap=st.floats(0.5, 8.0),
       original=st.sampled_from([32, 256, 8192]))
def test_llama3_inv_freq_matches_transformers(theta, half_dim, factor, low, gap, original):
    rope = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
            "high_freq_factor": low + gap, "original_max_position_embeddings": original}
    hf = HFLlamaConfig(hidden_size=2 * half_dim, num_attention_heads=1, rope_parameters=rope,
                       max_position_embeddings=2 * original)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf)
    ours = rope_inv_freq(LlamaConfig.from_hf(hf.to_dict()))
    np.testing.assert_allclose(ours, expected.numpy(), rtol=2e-6)


BASE_HF = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.mark.parametrize("change, field", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"vocab_size": None}, "vocab_size"),
    ({"model_type": "gemma"}, "model_type"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_config_rejects_unsupported_fields(change, field):
    with pytest.raises(ValueError, match=field):
        LlamaConfig.from_hf({**BASE_HF, **change})


def test_config_reads_v4_layout():
    cfg = LlamaConfig.from_hf({**BASE_HF, "rope_theta": 500.0, "eos_token_id": [5, 7],
                               "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 16}})
    assert cfg.rope_theta == 500.0 and cfg.rope_scaling.factor == 8.0 and cfg.eos_token_id == (5, 7)
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 8


# ----------------------------------------------------------------------------- adapter sites

@pytest.fixture(scope="module")
def tiny(checkpoints):
    model, _ = load_model(checkpoints["gqa_untied"][0])
    ids, mask, _ = padded_batches()[1]
    return model, jnp.asarray(ids), jnp.asarray(mask)


def _site_params(model, seed, rank=3):
    """LoRA factors for every site, different in every layer: a (L, r, d_in), b (L, d_out, r)."""
    keys = jax.random.split(jax.random.key(seed), 2 * len(model.site_shapes()))
    params = {}
    for i, (name, (layers, d_in, d_out)) in enumerate(sorted(model.site_shapes().items())):
        params[name] = {"a": jax.random.normal(keys[2 * i], (layers, rank, d_in)) * 0.3,
                        "b": jax.random.normal(keys[2 * i + 1], (layers, d_out, rank)) * 0.3}
    return params


def test_site_shapes_match_weights(tiny):
    model = tiny[0]
    weight_of = {"attn.q": "q", "attn.k": "k", "attn.v": "v", "attn.o": "o", "mlp.gate": "gate",
                 "mlp.up": "up", "mlp.down": "down"}
    assert set(model.site_shapes()) == set(weight_of)
    for site, shape in model.site_shapes().items():
        assert getattr(model.layers, weight_of[site])[...].shape == shape


@pytest.mark.parametrize("hook", [SiteHook(), SiteHook(weight_fn=lambda name, p, w, ctx: w)],
                         ids=["no_fns", "identity_weight_fn"])
def test_noop_adapter_is_bit_identical(tiny, hook):
    model, ids, mask = tiny
    # the hook is static (closed over), the site params are traced
    forward = jax.jit(lambda m, p: m(ids, mask, adapter=None if p is None else Adapter(hook, p)))
    plain = np.asarray(forward(model, None))
    adapted = np.asarray(forward(model, _site_params(model, 0)))
    assert np.array_equal(plain, adapted)


@pytest.mark.parametrize("site", ["attn.v", "mlp.down"])
def test_lora_delta_equals_merged_weight(tiny, site):
    model, ids, mask = tiny
    scale = 0.5
    lora = _site_params(model, 1)[site]
    # per-example ctx: example 0 gets no delta, the others the full delta
    ctx = jnp.array([0.0, 1.0, 1.0])
    hook = SiteHook(delta_fn=lambda name, p, x, c: ((x @ p["a"].T) @ p["b"].T) * scale * c[:, None, None])
    forward = jax.jit(lambda m, adapter_params: m(ids, mask, adapter=(
        None if adapter_params is None else Adapter(hook, adapter_params, ctx))))
    adapted = np.asarray(forward(model, {site: lora}))

    merged = nnx.clone(model)
    weight = {"attn.v": merged.layers.v, "mlp.down": merged.layers.down}[site]
    weight[...] = weight[...] + scale * jnp.einsum("lri,lor->lio", lora["a"], lora["b"])
    expected = np.asarray(forward(merged, None))
    plain = np.asarray(forward(model, None))
    keep = np.asarray(mask, bool)
    assert np.abs(expected - plain)[keep].max() > 1e-2  # the delta matters
    np.testing.assert_array_equal(adapted[0], plain[0])
    err = rel_err(adapted[1:], expected[1:], np.asarray(mask)[1:])
    print(f"\n[lora delta vs merged] {site}: rel err {err:.2e}")
    assert err <= 1e-5


def test_remat_same_values_and_gradients(tiny):
    model, ids, mask = tiny

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(ids, mask)) ** 2)

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    remat_model = nnx.clone(model)
    remat_model.remat = True
    value_r, grads_r = nnx.jit(nnx.value_and_grad(loss))(remat_model)
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(g_r, g, rtol=1e-5, atol=1e-7)


def test_random_init_bfloat16_left_padding_finite():
    config = LlamaConfig(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=3, head_dim=8)
    model = Llama(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    assert model.embed[...].dtype == jnp.bfloat16 and model.lm_head[...].shape == (24, 50)
    mask = jnp.array([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    logits = jax.jit(lambda m, ids: m(ids, mask))(model, jnp.ones((2, 5), jnp.int32))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 5, 50)
    assert np.isfinite(np.asarray(logits)).all()
