"""Greedy generation: the KV-cache decoder equals full recomputation; EOS handling; generate() text API."""
from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import T5Config, T5ForConditionalGeneration

from jaxcl.models import Adapter, Llama, SiteHook, generate, load_model, sites
from jaxcl.data.batching import pad_rows

NEVER = 64  # an id outside the tiny vocabulary: argmax never produces it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, save_tiny_llama):
    directory = tmp_path_factory.mktemp("llama_gen")
    save_tiny_llama(directory, seed=3, num_hidden_layers=3)
    return load_model(directory)


@functools.partial(jax.jit, static_argnames=("steps", "eos"))
def _cached(model, ids, mask, steps, eos):
    return model.generate_ids(ids, mask, max_new_tokens=steps, eos_token_id=eos)


@jax.jit
def _last_logits(model, ids, mask, column):
    return jnp.take(model(ids, mask), column, axis=1)


def _recomputed(model, ids, mask, steps, eos):
    """Greedy decoding by a full forward over the whole sequence at every step (no cache).

    The sequence lives in a fixed buffer (prompt + steps columns, unused columns masked out): the
    model is causal, so masked columns to the right do not change the logits of earlier ones.
    """
    eos = np.atleast_1d(eos)
    batch, prompt_len = ids.shape
    buffer = np.concatenate([ids, np.zeros((batch, steps), ids.dtype)], axis=1)
    buffer_mask = np.concatenate([mask, np.zeros((batch, steps), mask.dtype)], axis=1)
    out = np.full((batch, steps), eos[0])
    done = np.zeros(batch, bool)
    for t in range(steps):
        logits = _last_logits(model, jnp.asarray(buffer), jnp.asarray(buffer_mask), prompt_len + t - 1)
        token = np.where(done, eos[0], np.asarray(logits).argmax(-1))
        out[:, t] = token
        done |= np.isin(token, eos)
        buffer[:, prompt_len + t], buffer_mask[:, prompt_len + t] = token, 1
    return out


def _left_padded_prompts(seed=0, lengths=(5, 2, 7), width=8):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 64, (len(lengths), width)).astype(np.int32)
    mask = (np.arange(width)[None] >= width - np.array(lengths)[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, 0).astype(np.int32), mask


def test_kv_cache_equals_full_recomputation(tiny):
    model, _ = tiny
    ids, mask = _left_padded_prompts()
    cached = np.asarray(_cached(model, jnp.asarray(ids), jnp.asarray(mask), 8, NEVER))
    assert cached.shape == (3, 8) and cached.dtype == np.int32
    np.testing.assert_array_equal(cached, _recomputed(model, ids, mask, 8, NEVER))
    assert len({tuple(row) for row in cached}) > 1  # prompts of different lengths, different outputs


def test_kv_cache_equals_full_recomputation_with_sliding_window(tmp_path, save_tiny_causal_lm):
    """Mistral with a 3-slot window: the cached decoder's window covers prompt and generated slots."""
    save_tiny_causal_lm(tmp_path, "mistral", seed=4, sliding_window=3)
    model, _ = load_model(tmp_path)
    ids, mask = _left_padded_prompts(seed=1)
    cached = np.asarray(_cached(model, jnp.asarray(ids), jnp.asarray(mask), 8, NEVER))
    np.testing.assert_array_equal(cached, _recomputed(model, ids, mask, 8, NEVER))


def test_each_example_stops_at_its_own_eos(tiny):
    model, _ = tiny
    ids, mask = _left_padded_prompts()
    free = np.asarray(_cached(model, jnp.asarray(ids), jnp.asarray(mask), 8, NEVER))
    eos = (int(free[0, 2]), int(free[1, 4]))  # ids that example 0 / 1 emit mid-way

    expected = np.full_like(free, eos[0])
    for b, row in enumerate(free):
        stop = np.flatnonzero(np.isin(row, eos))
        end = stop[0] + 1 if stop.size else len(row)
        expected[b, :end] = row[:end]
    assert (expected != free).any()  # truncation actually happens

    stopped = np.asarray(_cached(model, jnp.asarray(ids), jnp.asarray(mask), 8, eos))
    np.testing.assert_array_equal(stopped, expected)
    np.testing.assert_array_equal(stopped, _recomputed(model, ids, mask, 8, eos))


def _reference_text(model, tokenizer, prompt, steps):
    ids = np.asarray([tokenizer(prompt)["input_ids"]], np.int32)
    tokens = _recomputed(model, ids, np.ones_like(ids), steps, tokenizer.eos_token_id)[0]
    stop = np.flatnonzero(tokens == tokenizer.eos_token_id)
    return tokenizer.decode(tokens[:stop[0] if stop.size else None], skip_special_tokens=True)


PROMPTS = ["w5 w9 w12", "w3", "w40 w41 w42 w43 w44 w45 w46 w47 w48 w49 w50 w51 w52 w53", "w7 w7"]


def test_generate_text_matches_unbatched_reference(tiny):
    model, tokenizer = tiny
    texts = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    expected = [_reference_text(model, tokenizer, p, 6) for p in PROMPTS]
    print(f"\n[generate] {texts}")
    assert texts == expected
    assert all(isinstance(t, str) for t in texts) and any(texts)


def test_generate_strips_at_eos(tiny):
    model, tokenizer = tiny
    free = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    stop_word = free[0].split()[2]  # a word the model emits mid-way: declare it the eos token
    stopping = copy.deepcopy(tokenizer)
    stopping.eos_token = stop_word
    texts = generate(model, stopping, PROMPTS, max_new_tokens=6, batch_size=3)
    expected = [" ".join(t.split()[:t.split().index(stop_word)] if stop_word in t.split() else t.split())
                for t in free]
    print(f"\n[generate, eos={stop_word}] {texts}")
    assert texts == expected and texts != free
    assert texts == [_reference_text(model, stopping, p, 6) for p in PROMPTS]


def test_generate_compiles_once_per_bucket(tiny, monkeypatch):
    model, tokenizer = tiny
    traces = []
    original = Llama.generate_ids
    monkeypatch.setattr(Llama, "generate_ids", lambda self, *a, **k: traces.append(1) or original(self, *a, **k))
    steps = 3  # not used elsewhere, so the jit cache starts empty for it
    generate(model, tokenizer, ["w5 w6", "w7"], max_new_tokens=steps)
    generate(model, tokenizer, ["w8 w9 w10 w11 w12", "w13 w14"], max_new_tokens=steps)
    assert len(traces) == 1
    generate(model, tokenizer, [" ".join(["w9"] * 17), "w3"], max_new_tokens=steps)  # next bucket
    assert len(traces) == 2


def test_generate_applies_adapter_per_example(tiny):
    model, tokenizer = tiny
    scale = 4.0
    keys = jax.random.split(jax.random.key(0), 2)
    layers, d_in, d_out = model.site_shapes()["mlp.up"]
    lora = {"a": jax.random.normal(keys[0], (layers, 2, d_in)), "b": jax.random.normal(keys[1], (layers, d_out, 2))}
    hook = SiteHook(delta_fn=lambda name, p, x, ctx: ((x @ p["a"].T) @ p["b"].T) * scale * ctx[:, None, None])
    on = jnp.array([1.0, 0.0, 1.0, 0.0])
    adapted = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3,
                       adapter=Adapter(hook, {"mlp.up": lora}, on))

    merged = nnx.clone(model)
    merged.layers.up[...] = merged.layers.up[...] + scale * jnp.einsum("lri,lor->lio", lora["a"], lora["b"])
    with_delta = generate(merged, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    plain = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    assert with_delta != plain  # the adapter changes the continuations
    assert adapted == [with_delta[0], plain[1], with_delta[2], plain[3]]


def test_generate_encoder_decoder_matches_transformers(tmp_path, save_tiny_tokenizer):
    """T5 through the same entry point: right padding, per-example EOS, a padded last batch."""
    torch.manual_seed(3)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, initializer_factor=3.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    reference = T5ForConditionalGeneration(config).eval()
    reference.save_pretrained(str(tmp_path))
    save_tiny_tokenizer(tmp_path, 64)
    model, tokenizer = load_model(tmp_path)
    assert model.is_encoder_decoder
    prompts = ["w5 w6 w7", "w9", "w10 w11 w12 w13 w14"]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                     do_sample=False)
        expected.append(tokenizer.decode(out[0, 1:], skip_special_tokens=True))  # drop the start token
    texts = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    print(f"\n[generate T5] {texts}")
    assert any(len(t.split()) < 6 for t in expected)  # one example stops at eos
    assert texts == expected


def test_pad_sides():
    ids, mask = pad_rows([[5, 6], [7]], 4, 0, left=True)
    np.testing.assert_array_equal(ids, [[0, 0, 5, 6], [0, 0, 0, 7]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1]])
    ids, mask = pad_rows([[5, 6], [7]], 4, 0, left=False)
    np.testing.assert_array_equal(ids, [[5, 6, 0, 0], [7, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 0, 0, 0]])


def test_generate_rejects_bad_arguments(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tokenizer, ["w5"], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"\[1\]"):
        generate(model, tokenizer, ["w5", ""], max_new_tokens=2)
    assert generate(model, tokenizer, [], max_new_tokens=2) == []


def _sparse_delta_hook() -> SiteHook:
    """A weight rewrite like MIST's: sparse float32 deltas scattered into the weight, the same for
    every example."""
    def weight_fn(name, p, w, ctx):
        flat = jnp.zeros((w.size,), jnp.float32).at[p["index"]].add(p["values"])
        return (w.astype(jnp.float32) + flat.reshape(w.shape)).astype(w.dtype)
    return SiteHook(weight_fn=weight_fn)


def _sparse_deltas(shape, count=40, seed=1) -> dict:
    layers, d_in, d_out = shape
    rng = np.random.default_rng(seed)
    index = np.stack([rng.choice(d_in * d_out, count, replace=False) for _ in range(layers)])
    return {"index": jnp.asarray(index, jnp.int32), "values": jnp.asarray(rng.normal(size=(layers, count)) * 3, jnp.float32)}


def _rewritten(hook, name, p, weights):
    """The stacked weights ``weights`` with ``hook``'s rewrite applied layer by layer."""
    return jax.vmap(lambda q, w: hook.weight_fn(name, q, w, None))(p, weights)


def _primitive_names(jaxpr) -> set:
    """Every primitive in ``jaxpr`` and the jaxprs nested in its equations (loop bodies, scans)."""
    def nested(value):  # a jaxpr, a closed jaxpr or a tuple of them (cond branches)
        if isinstance(value, (tuple, list)):
            return [j for v in value for j in nested(v)]
        value = getattr(value, "jaxpr", value)
        return [value] if hasattr(value, "eqns") else []

    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in nested(value):
                names |= _primitive_names(sub)
    return names


def test_a_shared_weight_rewrite_is_formed_once_before_decoding(tiny):
    model, _ = tiny
    ids, mask = (jnp.asarray(a) for a in _left_padded_prompts())
    hook = _sparse_delta_hook()
    deltas = {site: _sparse_deltas(model.site_shapes()[site]) for site in ("attn.q", "mlp.up")}

    def adapted(ids, mask):
        return model.generate_ids(ids, mask, max_new_tokens=8, eos_token_id=NEVER, adapter=Adapter(hook, deltas))

    merged = nnx.clone(model)
    merged.layers.q[...] = _rewritten(hook, "attn.q", deltas["attn.q"], model.layers.q[...])
    merged.layers.up[...] = _rewritten(hook, "mlp.up", deltas["mlp.up"], model.layers.up[...])
    got = np.asarray(jax.jit(adapted)(ids, mask))
    np.testing.assert_array_equal(got, _cached(merged, ids, mask, 8, NEVER))
    assert not np.array_equal(got, _cached(model, ids, mask, 8, NEVER))  # the rewrite changes the output

    jaxpr = jax.make_jaxpr(adapted)(ids, mask).jaxpr
    loops = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "while"]
    assert len(loops) == 1 and "scatter-add" in _primitive_names(jaxpr)  # formed before the loop ...
    assert "scatter-add" not in _primitive_names(loops[0].params["body_jaxpr"].jaxpr)  # ... not per token


def test_a_per_example_weight_rewrite_is_left_to_the_loop(tiny):
    model, _ = tiny
    hook = SiteHook(weight_fn=lambda name, p, w, ctx: w + ctx[:, None, None] * p["d"])
    layers, d_in, d_out = model.site_shapes()["mlp.up"]
    adapter = Adapter(hook, {"mlp.up": {"d": jnp.ones((layers, d_in, d_out))}}, jnp.array([0.0, 1.0]))
    assert sites.form_weights(adapter, model.site_weights()) is adapter
    lora_only = Adapter(SiteHook(delta_fn=lambda name, p, x, ctx: x), {"mlp.up": {}})
    assert sites.form_weights(lora_only, model.site_weights()) is lora_only
    assert sites.form_weights(None, model.site_weights()) is None


def test_t5_forms_a_shared_weight_rewrite_with_the_same_output():
    from jaxcl.models import t5
    config = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                         initializer_factor=3.0)
    model = t5.T5(config, rngs=nnx.Rngs(0))
    hook = _sparse_delta_hook()
    names = ("encoder.self_attn.v", "decoder.cross_attn.q", "decoder.mlp.wo")
    deltas = {site: _sparse_deltas(model.site_shapes()[site], seed=i) for i, site in enumerate(names)}
    merged = nnx.clone(model)
    for site in names:
        stack, name = site.split(".", 1)
        param = getattr(getattr(merged, stack).layers, name.replace(".", "_"))
        param[...] = _rewritten(hook, site, deltas[site], param[...])
    ids = jnp.asarray(np.random.default_rng(0).integers(2, 64, (3, 6)), jnp.int32)
    got = model.generate_ids(ids, None, max_new_tokens=6, eos_token_id=NEVER, adapter=Adapter(hook, deltas))
    want = merged.generate_ids(ids, None, max_new_tokens=6, eos_token_id=NEVER)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(want, model.generate_ids(ids, None, max_new_tokens=6, eos_token_id=NEVER))
