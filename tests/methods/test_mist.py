"""MIST on the tiny engine stream: Fisher-style MI sensitivity (per-example squared gradients),
per-layer masks, the float32 delta at the masked entries (through ``weight_fn``), its bfloat16
behaviour, gradient dropping and decay, layers an inner method freezes, and a full run."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcl import methods
from jaxcl.kernels import sensitivity
from jaxcl.methods import MIST, ModelInfo, OLoRA, SeqLoRA, StepContext
from jaxcl.methods import axes
from jaxcl.methods import mist as mist_module
from jaxcl.methods.features import pooled_features
from jaxcl.models.sites import Adapter
from jaxcl.train import config as jconfig
from jaxcl.train.checkpoint import Checkpointer
from jaxcl.train.loop import run

from tiny_cl import EngineSteps, task_info, tiny_config, tiny_llama, tiny_stream, tiny_t5


@pytest.fixture(scope="module")
def stream(stream_root, tiny_tokenizer):
    return tiny_stream(stream_root, tiny_tokenizer)


@pytest.fixture(scope="module")
def llama(tiny_tokenizer):
    return tiny_llama(len(tiny_tokenizer))


def _begun(method, model, stream, num_tasks=3, index=0, state=None):
    state = axes.values(method.init(jax.random.PRNGKey(0), ModelInfo.of(model), num_tasks)) if state is None else state
    return method.begin_task(jax.random.PRNGKey(1 + index), state, task_info(stream, index, model))


@pytest.fixture(scope="module")
def begun(llama, stream):
    """MIST (fraction 0.1, small InfoNCE batches) after begin_task of task 0 on the tiny Llama."""
    method = MIST(inner=SeqLoRA(dropout=0.0), fraction=0.1, batch_size=4, per_example_chunk=2)
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(llama)))
    return method, _begun(method, llama, stream), before


def _reference_squared_grads(model, method, batch, key, head_key, dense):
    """``Σ_i (∂ℓ_i/∂W)²`` by a Python loop over the examples: ℓ_i is example i's InfoNCE term (its two
    views as anchors) with every other example's embedding held fixed."""
    prompt, answers = mist_module._prompt_and_answers(batch, False)
    labels = jnp.tile(mist_module.answer_labels(answers), 2)
    rows = batch["input_ids"].shape[0]
    views = jnp.concatenate([mist_module._token_drop(jax.random.fold_in(key, v), prompt, method.token_drop)
                             for v in range(2)])
    ids = jnp.concatenate([batch["input_ids"]] * 2)

    def embed(delta):
        params = {site: {"dense": d} for site, d in delta.items()}
        features = pooled_features(model, ids, views, Adapter(mist_module._HOOK, params))
        return mist_module._projection_head(head_key, features, method.head_dim)

    held = jax.lax.stop_gradient(embed(dense))

    @jax.jit
    def squared(i, delta):
        def loss(d):
            own = (jnp.arange(2 * rows) % rows == i)[:, None]
            per_anchor = sensitivity.info_nce_per_anchor(jnp.where(own, embed(d), held), labels, method.temperature)
            return 0.5 * (per_anchor[i] + per_anchor[rows + i])
        return jax.tree.map(jnp.square, jax.grad(loss)(delta))

    total = jax.tree.map(jnp.zeros_like, dense)
    for i in range(rows):
        total = jax.tree.map(jnp.add, total, squared(i, dense))
    batch_loss = lambda d: jnp.mean(sensitivity.info_nce_per_anchor(embed(d), labels, method.temperature))  # noqa: E731
    return total, jax.jit(jax.grad(batch_loss))(dense)


def test_sensitivity_is_the_sum_of_per_example_squared_gradients(llama, stream, begun):
    method, state, _ = begun
    batches, count = method._scoring_batches(task_info(stream, 0, llama))
    assert count == len(stream.tasks[0].train) and len(batches) == -(-count // method.batch_size)
    graphdef, weights = nnx.split(llama)
    shapes = llama.site_shapes()
    dense = {site: jnp.zeros(shapes[site], jnp.float32) for site in state.fixed.index}
    past = {site: {"past_index": state.fixed.past_index[site], "past_values": state.fixed.past_values[site]}
            for site in dense}
    key, head_key = jax.random.PRNGKey(3), jax.random.PRNGKey(4)
    expected, batch_grad = _reference_squared_grads(llama, method, batches[0], key, head_key, dense)
    # the chunk only trades memory for sequential steps: every chunk gives the same scores
    for chunk in sorted({1, method.per_example_chunk, method.batch_size}):
        got = mist_module.per_example_squared_grads(weights, dense, past, batches[0], key, head_key, graphdef=graphdef,
                                                    temperature=method.temperature, token_drop=method.token_drop,
                                                    head_dim=method.head_dim, chunk=chunk)
        for site in dense:
            e = np.asarray(expected[site])
            assert e.max() > 0, site
            np.testing.assert_allclose(np.asarray(got[site]), e, rtol=2e-3, atol=1e-6 * e.max(), err_msg=f"{chunk}")
    options = dict(graphdef=graphdef, temperature=method.temperature, token_drop=method.token_drop, head_dim=method.head_dim)
    batch_scores = mist_module.batch_squared_grads(weights, dense, past, batches[0], key, head_key, **options)
    for site in dense:
        e, b = np.asarray(expected[site]), np.asarray(batch_grad[site]) ** 2
        # scoring="batch" (the official code's) is the square of the batch loss's gradient ...
        np.testing.assert_allclose(np.asarray(batch_scores[site]), b, rtol=2e-3, atol=1e-6 * b.max(), err_msg=site)
        # ... a different quantity from the per-example sum (scaled to the same total): the test tells them apart
        assert not np.allclose(b * e.sum() / b.sum(), e, rtol=0.1, atol=1e-3 * e.max()), site


def test_batch_scoring_averages_the_batches_squared_gradients(llama, stream, begun):
    method, state, _ = begun
    batched = dataclasses.replace(method, scoring="batch")
    info = task_info(stream, 0, llama)
    batches, _ = batched._scoring_batches(info)
    assert len(batches) > 1
    graphdef, weights = nnx.split(llama)
    shapes = llama.site_shapes()
    dense = {site: jnp.zeros(shapes[site], jnp.float32) for site in state.fixed.index}
    past = {site: {"past_index": state.fixed.past_index[site], "past_values": state.fixed.past_values[site]}
            for site in dense}
    key = jax.random.PRNGKey(5)
    key_views, key_head = jax.random.split(key)
    options = dict(graphdef=graphdef, temperature=method.temperature, token_drop=method.token_drop, head_dim=method.head_dim)
    each = [mist_module.batch_squared_grads(weights, dense, past, b, jax.random.fold_in(key_views, i), key_head, **options)
            for i, b in enumerate(batches)]
    got = batched.sensitivity(key, info, state)
    for site in dense:
        want = sum(np.asarray(e[site]) for e in each) / len(batches)
        np.testing.assert_allclose(np.asarray(got[site]), want, rtol=1e-5, atol=1e-7 * want.max(), err_msg=site)
    with pytest.raises(ValueError, match="scoring"):
        MIST(scoring="per_batch")


def test_sensitivity_updates_no_weight_and_masks_are_the_top_fraction_per_layer(llama, stream, begun):
    method, state, before = begun
    after = nnx.to_pure_dict(nnx.state(llama))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, after))
    key = jax.random.split(jax.random.PRNGKey(1))[1]  # the key begin_task scores with
    scores = method.sensitivity(key, task_info(stream, 0, llama), state)
    for site, (layers, d_in, d_out) in llama.site_shapes().items():
        s = np.asarray(scores[site]).reshape(layers, -1)
        assert np.all(s >= 0) and s.max() > 0, site
        index = np.asarray(state.fixed.index[site])
        assert index.shape == (layers, round(0.1 * d_in * d_out))
        for layer in range(layers):
            assert len(np.unique(index[layer])) == index.shape[1]
            chosen = np.zeros(d_in * d_out, bool)
            chosen[index[layer]] = True
            # every kept score >= every dropped score
            assert s[layer][chosen].min() >= s[layer][~chosen].max(), site
    np.testing.assert_array_equal(np.asarray(state.fixed.overlap)[0], [1.0, 0.0, 0.0])


def test_the_update_is_a_float32_delta_at_the_masked_entries_through_weight_fn(begun):
    method, state, _ = begun
    site = "attn.q"
    rng = np.random.default_rng(0)
    values = {s: jnp.asarray(rng.normal(size=v.shape) * 1e-3, jnp.float32) for s, v in state.params.values.items()}
    past_values = {s: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for s, v in state.fixed.past_values.items()}
    tuned = state._replace(params=state.params._replace(values=values),
                           fixed=state.fixed._replace(past_values=past_values))
    adapter = method.adapter(tuned, None)
    assert adapter.hook.weight_fn is not None
    for dtype in (jnp.float32, jnp.bfloat16):
        w = jnp.asarray(rng.normal(size=(32, 32)), dtype)
        layer = jax.tree.map(lambda a: a[1], adapter.params[site])
        index = np.asarray(state.fixed.index[site][1])
        got = np.asarray(adapter.hook.weight_fn(site, layer, w, adapter.ctx).astype(jnp.float32)).reshape(-1)
        # past slots are all index 0 (no earlier task): their values land on entry 0 only
        flat = np.zeros(w.size, np.float32)
        np.add.at(flat, np.asarray(state.fixed.past_index[site][1]).reshape(-1), np.asarray(past_values[site][1]).reshape(-1))
        np.add.at(flat, index, np.asarray(values[site][1]))
        expected = np.asarray((w.astype(jnp.float32).reshape(-1) + flat).astype(dtype).astype(jnp.float32))
        np.testing.assert_array_equal(got, expected)
        untouched = np.ones(w.size, bool)
        untouched[index] = False
        untouched[0] = False
        np.testing.assert_array_equal(got[untouched], np.asarray(w.astype(jnp.float32)).reshape(-1)[untouched])
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state.params.values))


def _changed_shares(dtype, stream, tokenizer_size, steps=4):
    """Share of masked entries whose delta a few engine steps changed (and the engine's own metric)."""
    model = tiny_llama(tokenizer_size, dtype=dtype)
    method = MIST(inner=SeqLoRA(dropout=0.0), fraction=0.1, batch_size=4, per_example_chunk=2,
                  sensitivity_examples=8)
    state = _begun(method, model, stream)
    feed = stream.train_feed(0, [0], [], None)
    trainer = EngineSteps(method, model, optax.adam(1e-2), stream.spec.max_answer_len)
    after, base, metrics = trainer.run(state, [feed(s) for s in range(steps)], StepContext.start(0, steps, 0))
    assert all(leaf is None for leaf in jax.tree.leaves(base, is_leaf=lambda x: x is None))  # backbone frozen
    moved = sum(int(np.sum(np.asarray(v) != 0)) for v in after.params.values.values())
    masked = sum(v.size for v in after.params.values.values())
    return moved / masked, [float(m["backbone_changed"]) for m in metrics]


@pytest.mark.slow
def test_bfloat16_steps_change_about_as_many_masked_entries_as_float32(stream, tiny_tokenizer):
    f32, f32_metric = _changed_shares(jnp.float32, stream, len(tiny_tokenizer))
    bf16, bf16_metric = _changed_shares(jnp.bfloat16, stream, len(tiny_tokenizer))
    assert f32 > 0.05, f32  # momentum 0.9 carries every kept gradient: a sizeable share moves
    assert bf16 >= 0.5 * f32, (bf16, f32)
    assert sum(bf16_metric) >= 0.5 * sum(f32_metric) > 0, (bf16_metric, f32_metric)


def test_transform_grads_keeps_masked_entries_scaled_by_decay_per_earlier_task(llama, stream):
    method = MIST(inner=SeqLoRA(dropout=0.0), sites=("attn.q",), fraction=0.3, keep_prob=1.0, decay=0.9,
                  batch_size=4, per_example_chunk=2, sensitivity_examples=8)
    state = None
    for t in range(3):
        state = _begun(method, llama, stream, index=t, state=state)
        if t < 2:
            state = method.end_task(state, task_info(stream, t, llama))
    index, past = np.asarray(state.fixed.index["attn.q"]), np.asarray(state.fixed.past_index["attn.q"])
    earlier = np.stack([[np.isin(index[l], past[l, s]) for s in range(2)] for l in range(index.shape[0])]).sum(axis=1)
    assert earlier.max() >= 1  # 30% masks over three tasks overlap
    np.testing.assert_allclose(state.fixed.scale["attn.q"], 0.9 ** earlier, rtol=1e-6)
    overlap = np.asarray(state.fixed.overlap)
    for s in range(2):
        share = np.mean([np.isin(index[l], past[l, s]) for l in range(index.shape[0])])
        np.testing.assert_allclose(overlap[2, s], share, rtol=1e-6)
    grads = {"method": state.params._replace(values={"attn.q": jnp.asarray(
        np.random.default_rng(0).normal(size=index.shape), jnp.float32)}), "base": {}}
    grads = dict(grads, method=grads["method"]._replace(inner=jax.tree.map(jnp.ones_like, state.params.inner)))
    step = StepContext.start(2, 5, 0)
    out = method.transform_grads(grads, state, jax.random.PRNGKey(0), step)["method"].values["attn.q"]
    expected = np.asarray(grads["method"].values["attn.q"]) * 0.9 ** earlier
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    dropping = MIST(inner=SeqLoRA(dropout=0.0), sites=("attn.q",), keep_prob=0.5)
    dropped = np.asarray(dropping.transform_grads(grads, state, jax.random.PRNGKey(1), step)["method"].values["attn.q"])
    kept = dropped != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(dropped[kept], expected[kept], rtol=1e-6)


@pytest.mark.slow
def test_mist_around_any_ssr_never_tunes_the_router_feature_layers(llama, stream):
    method = methods.build("mist+any_ssr", {"expansion_dim": 16, "mist_fraction": 0.1, "mist_batch_size": 4,
                                            "mist_per_example_chunk": 2, "mist_sensitivity_examples": 8,
                                            "dropout": 0.0})
    depth = method.frozen_below(llama.config.num_hidden_layers)
    assert depth == 1
    state = _begun(method, llama, stream)
    for site, scale in state.fixed.scale.items():
        np.testing.assert_array_equal(np.asarray(scale)[:depth], 0.0)
        assert np.all(np.asarray(scale)[depth:] == 1.0), site
    feed = stream.train_feed(0, [0], [], None)
    trainer = EngineSteps(method, llama, optax.adam(1e-2), stream.spec.max_answer_len)
    after, _, _ = trainer.run(state, [feed(s) for s in range(3)], StepContext.start(0, 3, 0))
    for site, values in after.params.values.items():
        np.testing.assert_array_equal(np.asarray(values)[:depth], 0.0)
        assert np.any(np.asarray(values)[depth:] != 0), site
    # the weights the forward pass sees: the base model's in the router's layer, tuned above it
    base_q = nnx.to_pure_dict(nnx.state(llama))["layers"]["q"]
    adapter = method.adapter(after, None)
    for layer, untouched in ((0, True), (1, False)):
        sliced = jax.tree.map(lambda a: a[layer], adapter.params["attn.q"])
        seen = adapter.hook.weight_fn("attn.q", sliced, base_q[layer], adapter.ctx)
        assert np.array_equal(np.asarray(seen), np.asarray(base_q[layer])) == untouched, layer


def test_sensitivity_uses_masked_attention_when_the_model_runs_a_fused_path(stream, tiny_tokenizer):
    method = MIST(inner=SeqLoRA(dropout=0.0), fraction=0.1, batch_size=4, per_example_chunk=2, sensitivity_examples=8)
    plain = tiny_llama(len(tiny_tokenizer))
    fused = tiny_llama(len(tiny_tokenizer))
    fused.attention = "xla"
    state = axes.values(method.init(jax.random.PRNGKey(0), ModelInfo.of(plain), 3))
    key = jax.random.PRNGKey(5)
    expected = method.sensitivity(key, task_info(stream, 0, plain), state)
    got = method.sensitivity(key, task_info(stream, 0, fused), state)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    assert fused.attention == "xla"  # the caller's model keeps its own path


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_site_patterns_pick_the_tuned_sites(family, tiny_tokenizer):
    model = (tiny_llama if family == "llama" else tiny_t5)(len(tiny_tokenizer))
    patterns = {"llama": ("attn.q", "mlp.down"), "t5": ("attn.q", "mlp.wo")}[family]
    method = MIST(inner=SeqLoRA(sites=("q",)), sites=patterns)
    state = axes.values(method.init(jax.random.PRNGKey(0), ModelInfo.of(model), 2))
    expected = {"llama": ["attn.q", "mlp.down"],
                "t5": ["decoder.cross_attn.q", "decoder.mlp.wo", "decoder.self_attn.q", "encoder.mlp.wo",
                       "encoder.self_attn.q"]}[family]
    assert sorted(state.fixed.index) == expected == sorted(state.params.values)
    for site in expected:
        layers, d_in, d_out = model.site_shapes()[site]
        assert state.params.values[site].shape == (layers, round(method.fraction * d_in * d_out))
        assert int(state.fixed.matrix_size[site]) == d_in * d_out
    assert not any(method.base_trainable(p) for p in ("layers/q", "layers/down", "embed"))
    with pytest.raises(ValueError, match="match no site"):
        MIST(sites=("attn.nothing",)).init(jax.random.PRNGKey(0), ModelInfo.of(model), 2)


def test_t5_sensitivity_scores_encoder_and_decoder_weights(stream_root, tiny_tokenizer):
    model = tiny_t5(len(tiny_tokenizer))
    stream = tiny_stream(stream_root, tiny_tokenizer, encoder_decoder=True)
    method = MIST(inner=SeqLoRA(sites=("q",)), sites=("attn.q", "mlp.wo"), fraction=0.1, batch_size=4,
                  per_example_chunk=2, sensitivity_examples=8)
    state = axes.values(method.init(jax.random.PRNGKey(0), ModelInfo.of(model), 2))
    scores = method.sensitivity(jax.random.PRNGKey(1), task_info(stream, 0, model), state)
    for site, score in scores.items():
        # The decoder's start-token state reaches the decoder's weights, except the q of its
        # self-attention: one token attends only to itself, so q (and k) get no gradient.
        if site == "decoder.self_attn.q":
            np.testing.assert_array_equal(score, 0.0)
        else:
            assert np.asarray(score).max() > 0, site


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 4), st.integers(1, 40))
def test_earlier_choices_marks_exactly_the_entries_an_earlier_task_chose(seed, layers, tasks, n):
    """Entry e of the current mask is marked for task s iff s < task and task s's mask holds e."""
    rng = np.random.default_rng(seed)
    pick = lambda: np.sort(rng.choice(4 * n, n, replace=False))  # masks are sorted positions
    index = np.stack([pick() for _ in range(layers)]).astype(np.int32)
    past = np.stack([np.stack([pick() for _ in range(tasks)]) for _ in range(layers)]).astype(np.int32)
    task = int(rng.integers(0, tasks + 1))
    found = np.asarray(mist_module._earlier_choices(jnp.asarray(index), jnp.asarray(past), jnp.int32(task)))
    expected = np.stack([[np.isin(index[l], past[l, s]) & (s < task) for s in range(tasks)] for l in range(layers)])
    np.testing.assert_array_equal(found, expected)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 60), st.integers(1, 6))
def test_top_entries_are_each_layers_highest_scores_lower_position_first_among_ties(seed, layers, size, levels):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, (layers, size, 2)).astype(np.float32)  # few levels: many ties
    count = int(rng.integers(1, 2 * size + 1))
    flat = scores.reshape(layers, -1)
    expected = np.sort(np.argsort(-flat, axis=1, kind="stable")[:, :count], axis=1)
    np.testing.assert_array_equal(np.asarray(mist_module.top_entries(jnp.asarray(scores), count)), expected)


def test_earlier_choices_memory_grows_linearly_with_the_mask():
    """SmolLM2's 5 % masks hold ~44k entries a layer: an all-pairs compare would need n^2 bytes per
    layer and task (XLA:CPU materialised 113 GiB on the real model)."""
    layers, tasks, n = 2, 3, 40_000
    shapes = (jax.ShapeDtypeStruct((layers, n), jnp.int32), jax.ShapeDtypeStruct((layers, tasks, n), jnp.int32),
              jax.ShapeDtypeStruct((), jnp.int32))
    memory = mist_module._earlier_choices.lower(*shapes).compile().memory_analysis()
    assert memory.temp_size_in_bytes < 64 * layers * tasks * n


def test_build_wraps_any_method_and_checks_mist_options():
    method = methods.build("mist+olora", {"mist_fraction": 0.1, "mist_keep_prob": 0.2, "lambda1": 0.3})
    assert isinstance(method, MIST) and isinstance(method.inner, OLoRA) and method.replay is None
    assert (method.fraction, method.keep_prob, method.inner.lambda1) == (0.1, 0.2, 0.3)
    assert methods.build("mist+any_ssr", {}).routes and not method.routes
    assert methods.build("mist+mtl", {}).joint
    assert methods.build("mist+replay+olora", {"replay_fraction": 0.5}).replay.fraction == 0.5
    for bad, message in (({"mist_fraction": "many"}, "mist_fraction: expected float"),
                         ({"mist_inner": "x"}, "not an option of mist"),
                         ({"mist_fraction": 1.5}, r"mist fraction must be in \(0, 1\]")):
        with pytest.raises(methods.MethodError, match=message):
            methods.build("mist+seq_lora", bad)


def test_backbone_gets_its_own_sgd_while_the_inner_method_keeps_the_run_optimizer():
    inner = {"a": jnp.ones(3)}
    params = {"method": mist_module.MISTParams(inner, {"attn.q": jnp.ones((2, 2))}), "base": {}}
    grads = jax.tree.map(jnp.ones_like, params)
    own = MIST(inner=SeqLoRA(), backbone_lr=1e-2, backbone_momentum=0.5).optimizer(optax.sgd(0.5))
    state = own.init(params)
    for expected in (-1e-2, -1.5e-2):  # momentum: g, then 0.5 g + g
        updates, state = own.update(grads, state, params)
        np.testing.assert_allclose(updates["method"].inner["a"], -0.5, rtol=1e-6)
        np.testing.assert_allclose(updates["method"].values["attn.q"], expected, rtol=1e-6)
    shared = MIST(inner=SeqLoRA(), backbone_lr=None).optimizer(optax.sgd(0.5))
    updates, _ = shared.update(grads, shared.init(params), params)
    np.testing.assert_allclose(updates["method"].values["attn.q"], -0.5, rtol=1e-6)


@pytest.mark.slow
def test_full_run_reports_mask_overlap_and_the_deltas_of_each_task(tmp_path, stream_root, tiny_model):
    model, tok = tiny_model
    initial = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))
    cfg = jconfig.from_dict(tiny_config(stream_root, method="mist+olora",
                                        method_args={"mist_fraction": 0.1, "dropout": 0.0, "mist_batch_size": 8,
                                                     "mist_per_example_chunk": 4}))
    results = run(cfg, str(tmp_path), progress=False, model_and_tokenizer=(model, tok))
    report = results["method_report"]["mist"]
    overlap = np.array(report["mask_overlap"])
    assert overlap.shape == (3, 3)
    np.testing.assert_allclose(np.diag(overlap), 1.0)
    assert np.all(overlap[np.triu_indices(3, 1)] == 0)
    ckpt = Checkpointer(str(tmp_path))
    step, _ = ckpt.latest()
    fixed = ckpt.restore(step, "fixed")
    ckpt.close()
    past_index, past_values = fixed["past_index"], fixed["past_values"]
    # the overlap matrix is what the stored masks say
    for t in range(3):
        for s in range(t):
            pairs = [(np.asarray(idx)[l, t], np.asarray(idx)[l, s])
                     for idx in past_index.values() for l in range(np.asarray(idx).shape[0])]
            share = sum(np.isin(a, b).sum() for a, b in pairs) / sum(a.size for a, _ in pairs)
            assert abs(overlap[t, s] - share) < 1e-5
    # every task's delta moved some masked entries (and at most its mask's share of the weights)
    changed = np.array(report["changed_share_per_task"])
    assert changed.shape == (3,) and np.all(changed > 0) and np.all(changed <= 0.1 + 1e-6), changed
    for site, values in past_values.items():
        assert np.asarray(values).shape[1] == 3
    # the caller's model is untouched: MIST never writes base weights
    jax.tree.map(np.testing.assert_array_equal, initial, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model))))
    with open(tmp_path / "log.jsonl", encoding="utf-8") as f:
        logged = [r["backbone_changed"] for r in map(json.loads, f) if r["event"] == "step"]
    assert len(logged) == 18 and max(logged) > 0 and all(0.0 <= c <= 0.1 + 1e-6 for c in logged), logged
