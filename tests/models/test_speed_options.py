"""Step-speed options compute what the default model computes: logits, gradients (of adapter state
and of the weights) and greedy generation, for the Llama family and T5 (CPU: values only; speed is
measured on GPU)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcl.models import Llama, LlamaConfig, SiteHook, sites, t5

# option name -> model attributes to set
OPTIONS = {"unrolled": dict(scan_layers=False)}
LORA_SITES = {"llama": ("attn.q", "mlp.up", "mlp.down"), "t5": ("encoder.self_attn.v", "decoder.cross_attn.k",
                                                                 "decoder.mlp.wi_1")}


def _llama():
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=4, biases=("q", "k", "v"),
                         sliding_window=5, initializer_range=0.2)
    return Llama(config, rngs=nnx.Rngs(0))


def _t5():
    config = t5.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=3,
                         num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=10,
                         feed_forward_proj="gated-gelu", tie_word_embeddings=False, initializer_factor=2.0)
    return t5.T5(config, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module", params=["llama", "t5"])
def family(request):
    return request.param, _llama() if request.param == "llama" else _t5()


def _batch(family_name):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(2, 50, (3, 9)))
    mask = np.ones((3, 9), np.int32)
    if family_name == "llama":
        mask[1, :3] = mask[2, :6] = 0  # left padding
        return ids, jnp.asarray(mask)
    mask[1, 6:] = mask[2, 2:] = 0  # right padding
    dec_mask = np.ones((3, 6), np.int32)
    dec_mask[2, 3:] = 0
    return ids, jnp.asarray(mask), jnp.asarray(rng.integers(2, 50, (3, 6))), jnp.asarray(dec_mask)


def _lora(model, names):
    keys = jax.random.split(jax.random.key(3), 2 * len(names))
    params = {}
    for i, name in enumerate(names):
        layers, d_in, d_out = model.site_shapes()[name]
        params[name] = {"a": jax.random.normal(keys[2 * i], (layers, d_in, 2)) * 0.5,
                        "b": jax.random.normal(keys[2 * i + 1], (layers, 2, d_out)) * 0.5}
    return params


HOOKS = {"delta": SiteHook(delta_fn=lambda name, p, x, ctx: (x @ p["a"]) @ p["b"]),
         "weight": SiteHook(weight_fn=lambda name, p, w, ctx: w + p["a"] @ p["b"])}


def _with(model, **attributes):
    model = nnx.clone(model)
    for name, value in attributes.items():
        setattr(model, name, value)
    return model


@functools.partial(jax.jit, static_argnames="hook")
def _loss_and_grads(model, params, batch, hook):
    def loss(model, params):
        logits = model(*batch, adapter=sites.Adapter(hook, params))
        return jnp.mean(jax.nn.log_softmax(logits) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1))(model, params)


def _close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize("hook", list(HOOKS))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_logits_and_gradients_unchanged(family, option, hook):
    name, model = family
    batch = _batch(name)
    params = _lora(model, LORA_SITES[name])
    base = _loss_and_grads(model, params, batch, HOOKS[hook])
    other = _loss_and_grads(_with(model, **OPTIONS[option]), params, batch, HOOKS[hook])
    print(f"\n[{name} {option} {hook}] |dloss| = {abs(float(base[0]) - float(other[0])):.1e}")
    _close(other, base, 1e-5)
    if hook == "weight":
        return
    plain = jax.jit(lambda m: m(*batch))
    print(f"[{name} {option}] max|dlogits| = {np.abs(plain(_with(model, **OPTIONS[option])) - plain(model)).max():.1e}")
    _close(plain(_with(model, **OPTIONS[option])), plain(model), 1e-6)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_generation_unchanged(family, option):
    name, model = family
    ids, mask = _batch(name)[:2]
    adapter = sites.Adapter(HOOKS["delta"], _lora(model, LORA_SITES[name]))
    generate = jax.jit(lambda m: m.generate_ids(ids, mask, max_new_tokens=7, eos_token_id=-1, adapter=adapter))
    np.testing.assert_array_equal(generate(_with(model, **OPTIONS[option])), generate(model))


def test_unrolled_layers_have_no_loop_and_no_dynamic_slice(family):
    name, model = family
    batch = _batch(name)
    forward = lambda m: m(*batch)  # noqa: E731
    unrolled = str(jax.make_jaxpr(forward)(_with(model, scan_layers=False)))
    assert "scan" in str(jax.make_jaxpr(forward)(model))
    assert "scan" not in unrolled and "while" not in unrolled and "dynamic_slice" not in unrolled
