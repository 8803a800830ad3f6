"""The observation channel: ``observe`` evaluates ``fn`` on each site's input inside the layer scan.
Reference: the same inputs captured another way, by a ``delta_fn`` that hands ``x`` to a host
callback (and adds nothing)."""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcl.models import Llama, LlamaConfig, SiteHook, sites, t5

LORA_SITE = {"llama": "attn.v", "t5": "encoder.self_attn.k"}  # an adapted site before others


def covariance(site, x, mask):
    return {"cov": jnp.einsum("bsi,bsj,bs->ij", x, x, mask), "tokens": mask.sum()}


def _lora(model, site, seed=0):
    layers, d_in, d_out = model.site_shapes()[site]
    ka, kb = jax.random.split(jax.random.key(seed))
    return {"a": jax.random.normal(ka, (layers, d_in, 2)) * 0.5, "b": jax.random.normal(kb, (layers, 2, d_out)) * 0.5}


def _lora_delta(name, p, x, ctx):
    return (x @ p["a"]) @ p["b"]


def _captured_inputs(run, model, lora_site, lora):
    """``{site: [x of layer 0, layer 1, ...]}`` of every site, recorded by a host callback in a
    delta_fn that adds nothing (besides the LoRA at ``lora_site``)."""
    captured = collections.defaultdict(list)

    def delta(name, p, x, ctx):
        jax.debug.callback(lambda x, name=name: captured[name].append(np.asarray(x)), x, ordered=True)
        return _lora_delta(name, p, x, ctx) if name == lora_site else jnp.zeros((*x.shape[:-1], p.shape[-1]), x.dtype)

    params = {name: jnp.zeros((layers, d_out)) for name, (layers, _, d_out) in model.site_shapes().items()}
    params[lora_site] = lora
    run(sites.Adapter(SiteHook(delta_fn=delta), params))
    return captured


def _check(observed, captured, masks):
    assert set(observed) == set(masks)
    for site, mask in masks.items():
        xs = np.stack(captured[site])
        expected = np.einsum("lbsi,lbsj,bs->lij", xs, xs, mask)
        assert observed[site]["cov"].shape == expected.shape  # (num_layers, d_in, d_in)
        np.testing.assert_allclose(observed[site]["cov"], expected, rtol=1e-5, atol=1e-5, err_msg=site)
        np.testing.assert_allclose(observed[site]["tokens"], np.full(len(xs), mask.sum()))


def test_llama_observe_equals_captured_inputs():
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=4, biases=("q", "k", "v"),
                         sliding_window=4, initializer_range=0.2)
    model = Llama(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 50, (3, 9)))
    mask = np.ones((3, 9), np.float32)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    lora = _lora(model, LORA_SITE["llama"])
    captured = _captured_inputs(lambda adapter: model(ids, jnp.asarray(mask), adapter=adapter), model,
                                LORA_SITE["llama"], lora)
    adapter = sites.Adapter(SiteHook(delta_fn=_lora_delta), {LORA_SITE["llama"]: lora})
    names = sorted(model.site_shapes())
    observed = jax.jit(lambda m, i, k: m.observe(i, k, covariance, sites=names, adapter=adapter))(
        model, ids, jnp.asarray(mask))
    _check(observed, captured, {name: mask for name in names})
    model.attention = "xla"  # observe ignores the length attention (it would rotate the rows)
    again = jax.jit(lambda m, i, k: m.observe(i, k, covariance, sites=["mlp.down"], adapter=adapter))(
        model, ids, jnp.asarray(mask))
    np.testing.assert_allclose(again["mlp.down"]["cov"], observed["mlp.down"]["cov"], rtol=1e-6, atol=1e-6)
    sub = model.observe(ids, jnp.asarray(mask), covariance, sites=["attn.q"], adapter=adapter, num_layers=2)
    np.testing.assert_allclose(sub["attn.q"]["cov"], observed["attn.q"]["cov"][:2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"observe: sites \['attn.x'\] are not site names"):
        model.observe(ids, None, covariance, sites=["attn.q", "attn.x"])


@pytest.mark.parametrize("ffn", ["relu", "gated-gelu"])
def test_t5_observe_equals_captured_inputs(ffn):
    config = t5.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=3,
                         num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=10,
                         feed_forward_proj=ffn, tie_word_embeddings=False)
    model = t5.T5(config, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    ids, dec = jnp.asarray(rng.integers(2, 50, (2, 7))), jnp.asarray(rng.integers(2, 50, (2, 5)))
    src = np.ones((2, 7), np.float32)
    src[1, 4:] = 0
    tgt = np.ones((2, 5), np.float32)
    tgt[0, 3:] = 0
    lora = _lora(model, LORA_SITE["t5"])
    captured = _captured_inputs(lambda adapter: model(ids, jnp.asarray(src), dec, jnp.asarray(tgt), adapter=adapter),
                                model, LORA_SITE["t5"], lora)
    adapter = sites.Adapter(SiteHook(delta_fn=_lora_delta), {LORA_SITE["t5"]: lora})
    names = sorted(model.site_shapes())
    observed = jax.jit(lambda m: m.observe(ids, jnp.asarray(src), covariance, sites=names, decoder_input_ids=dec,
                                           decoder_attention_mask=jnp.asarray(tgt), adapter=adapter))(model)
    reads_encoder = lambda n: n.startswith("encoder.") or n in ("decoder.cross_attn.k", "decoder.cross_attn.v")  # noqa: E731
    _check(observed, captured, {n: src if reads_encoder(n) else tgt for n in names})
    encoder_only = model.observe(ids, jnp.asarray(src), covariance, sites=["encoder.mlp.wo"], adapter=adapter)
    np.testing.assert_allclose(encoder_only["encoder.mlp.wo"]["cov"], observed["encoder.mlp.wo"]["cov"], rtol=1e-5)
    with pytest.raises(ValueError, match="need decoder_input_ids"):
        model.observe(ids, None, covariance, sites=["decoder.self_attn.q"])
