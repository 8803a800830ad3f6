"""MIST on the tiny engine stream: MI sensitivity without weight updates, per-layer masks, sparse and
thinned backbone updates (bit-identical outside the mask), decay, mask overlap, and a full run."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcl import methods
from jaxcl.data import batching, load_stream, tokenization
from jaxcl.methods import MIST, SeqLoRA, TaskInfo
from jaxcl.methods.mist import current_mask, mask_index, site_path
from jaxcl.train import config as jconfig
from jaxcl.train import step as jstep
from jaxcl.train.checkpoint import Checkpointer
from jaxcl.train.loop import run

from tiny_cl import TASKS, tiny_config, tiny_llama, tiny_t5

BATCH = 8


@pytest.fixture(scope="module")
def stream(stream_root, tiny_tokenizer):
    tasks = load_stream("cl_benchmark", list(TASKS), stream_root)
    spec = tokenization.make_batch_spec(tiny_tokenizer, "decoder", 48, 4, bucket_multiple=16)
    return [tokenization.tokenize_examples(t.train, tiny_tokenizer, spec) for t in tasks], spec


def _batches(rows, index, spec):
    """``TaskInfo.batches`` of one task: every row once, the last batch filled up with filler rows."""
    for start in range(0, len(rows), BATCH):
        chunk = rows[start:start + BATCH]
        real = np.arange(BATCH) < len(chunk)
        b = batching.collate_train(chunk + [chunk[-1]] * (BATCH - len(chunk)), real, spec)
        b.pop("position_ids", None)
        yield dict(b, task_ids=np.full(BATCH, index, np.int32), real=real)


def _info(model, stream, index):
    rows, spec = stream
    return TaskInfo(index, len(rows), list(TASKS)[index], batches=lambda: _batches(rows[index], index, spec), model=model)


def test_sensitivity_updates_no_weight_and_masks_keep_the_fraction_per_layer(tiny_model, stream):
    model, _ = tiny_model
    method = MIST(inner=SeqLoRA(dropout=0.0), fraction=0.1)
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))
    state = method.init(jax.random.PRNGKey(0), model.site_shapes(), 3)
    key = jax.random.split(jax.random.PRNGKey(1))[1]  # the key begin_task scores with
    scores = method.sensitivity(key, _info(model, stream, 0), state)
    state = method.begin_task(jax.random.PRNGKey(1), state, _info(model, stream, 0), model.site_shapes())
    after = nnx.to_pure_dict(nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, after))
    mist = state["fixed"]["mist"]
    for site, (layers, d_in, d_out) in model.site_shapes().items():
        assert np.all(np.asarray(scores[site]) >= 0) and np.asarray(scores[site]).max() > 0, site
        mask = np.asarray(current_mask(mist["selected"][site], mist["task"]))
        per_layer = mask.reshape(layers, -1).sum(axis=1)
        np.testing.assert_array_equal(per_layer, round(0.1 * d_in * d_out), err_msg=site)
        # the mask is the top of the scores: every kept score >= every dropped score, per layer
        s = np.asarray(scores[site]).reshape(layers, -1)
        m = mask.reshape(layers, -1)
        assert np.all(s[m].reshape(layers, -1).min(axis=1) >= np.where(m, -np.inf, s).max(axis=1)), site


def test_transform_grads_keeps_masked_entries_scaled_by_decay_per_earlier_task():
    shape = (2, 6, 5)
    rng = np.random.default_rng(0)
    current = np.zeros(shape, bool)  # task 2 chose 7 entries per layer (topk_mask keeps equal counts) ...
    for layer in current:
        layer.flat[rng.choice(layer.size, 7, replace=False)] = True
    bits = (rng.integers(0, 4, size=shape) | current << 2).astype(np.uint8)  # ... tasks 0 and 1 at random
    method = MIST(inner=SeqLoRA(), sites=("attn.q",), keep_prob=1.0, decay=0.9)
    grad = rng.normal(size=shape).astype(np.float32)
    index = mask_index(current)
    state = {"train": {}, "fixed": {"mist": {"selected": {"attn.q": jnp.asarray(bits)}, "task": jnp.int32(2),
                                             "overlap": jnp.zeros((3, 3)), "index": {"attn.q": index}}}}
    grads = {"method": {}, "base": {"layers": {"q": jnp.asarray(grad), "k": None}}}
    out = np.asarray(method.transform_grads(grads, state, jax.random.PRNGKey(0))["base"]["layers"]["q"])
    earlier = (bits & 1) + ((bits >> 1) & 1)
    expected = np.where(bits & 4, grad * 0.9 ** earlier, 0.0)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # with dropping: only masked entries survive, each unchanged apart from the decay
    dropped = np.asarray(MIST(inner=SeqLoRA(), sites=("attn.q",), keep_prob=0.5).transform_grads(
        grads, state, jax.random.PRNGKey(1))["base"]["layers"]["q"])
    kept = dropped != 0
    assert 0 < kept.sum() < (bits & 4).astype(bool).sum()
    np.testing.assert_allclose(dropped[kept], expected[kept], rtol=1e-6)


def _train(model, stream, method, state, tx, steps):
    """``steps`` engine train steps on task 0 from ``state``; the layer weights after each step."""
    rows, spec = stream
    graphdef, params = nnx.split(model)
    trained, frozen = jstep.split_base(method, nnx.to_pure_dict(params))
    p = jax.tree.map(jnp.copy, {"method": state["train"], "base": trained})
    ts = jstep.TrainState(p, tx.init(p), jnp.int32(0))
    fn = jax.jit(functools.partial(jstep.train_step, graphdef=graphdef, method=method, tx=tx,
                                   max_targets=spec.max_answer_len), donate_argnums=(0,))
    history = [jax.tree.map(np.array, ts.params["base"]["layers"])]
    for s in range(steps):
        b = batching.train_batch(rows[0], BATCH, 0, s, spec)
        b.pop("position_ids")
        b["task_ids"] = np.zeros(BATCH, np.int32)
        b.pop("example_index")
        ts, _ = fn(ts, frozen, state["fixed"], {k: v[None] for k, v in b.items()}, jax.random.PRNGKey(100 + s))
        history.append(jax.tree.map(np.array, ts.params["base"]["layers"]))
    return history


def _changed_per_step(history, masks):
    """Per step: (share of site entries that changed, whether any entry outside the mask changed)."""
    total = sum(m.size for m in masks.values())
    shares, outside = [], False
    for prev, cur in zip(history, history[1:]):
        changed = {k: prev[k] != cur[k] for k in masks}
        shares.append(sum(int(c.sum()) for c in changed.values()) / total)
        outside |= any(bool((c & ~masks[k]).any()) for k, c in changed.items())
    return np.array(shares), outside


@pytest.mark.slow
def test_backbone_changes_only_inside_the_mask_about_k_times_keep_prob_per_step(tiny_model, stream):
    model, _ = tiny_model
    k, keep = 0.05, 0.1
    method = MIST(inner=SeqLoRA(dropout=0.0), fraction=k, keep_prob=keep)
    steps = 8
    state = method.init(jax.random.PRNGKey(0), model.site_shapes(), 3)
    state = method.begin_task(jax.random.PRNGKey(1), state, _info(model, stream, 0), model.site_shapes())
    mist = state["fixed"]["mist"]
    masks = {site_path(site).split("/")[1]: np.asarray(current_mask(mist["selected"][site], mist["task"]))
             for site in method.sites}
    # Plain SGD: an entry moves only on a step that kept its gradient.
    shares, outside = _changed_per_step(_train(model, stream, method, state, optax.sgd(1e-2), steps), masks)
    assert not outside
    tolerance = 0.003  # ~3.5 standard deviations of a Binomial(922, 0.1) count over 18432 entries
    assert np.all(shares <= k * keep + tolerance), shares
    assert np.all(shares > 0), shares
    print("share of site weights changed per step, plain SGD:", np.round(shares, 5))
    # Momentum carries earlier gradients: more entries move per step, still only inside the mask (the
    # full run below checks the same with AdamW).
    stateful, outside = _changed_per_step(_train(model, stream, method, state, optax.sgd(1e-2, momentum=0.9), steps),
                                          masks)
    print("share changed per step, SGD with momentum 0.9:", np.round(stateful, 5))
    assert not outside
    assert np.all(stateful <= k) and stateful[-1] > k * keep + tolerance, stateful


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_site_patterns_make_exactly_the_site_weights_trainable(family, tiny_tokenizer):
    model = (tiny_llama if family == "llama" else tiny_t5)(len(tiny_tokenizer))
    patterns = {"llama": ("attn.q", "mlp.down"), "t5": ("attn.q", "mlp.wo")}[family]
    method = MIST(inner=SeqLoRA(sites=("q",)), sites=patterns)
    state = method.init(jax.random.PRNGKey(0), model.site_shapes(), 2)
    sites = sorted(state["fixed"]["mist"]["selected"])
    expected = {"llama": ["attn.q", "mlp.down"],
                "t5": ["decoder.cross_attn.q", "decoder.mlp.wo", "decoder.self_attn.q", "encoder.mlp.wo",
                       "encoder.self_attn.q"]}[family]
    assert sites == expected
    base = nnx.to_pure_dict(nnx.state(model))
    trained, _ = jstep.split_base(method, base)
    paths = {jstep.path_str(p) for p, x in jax.tree_util.tree_flatten_with_path(trained)[0]}
    assert paths == {site_path(s) for s in sites}
    for site in sites:
        assert _get_path(base, site_path(site)).shape == model.site_shapes()[site]
    with pytest.raises(ValueError, match="match no site"):
        MIST(sites=("attn.nothing",)).init(jax.random.PRNGKey(0), model.site_shapes(), 2)


def _get_path(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def test_t5_sensitivity_scores_encoder_and_decoder_weights(stream_root, tiny_tokenizer):
    model = tiny_t5(len(tiny_tokenizer))
    task = load_stream("cl_benchmark", list(TASKS), stream_root)[0]
    spec = tokenization.make_batch_spec(tiny_tokenizer, "seq2seq", 48, 4, bucket_multiple=16)
    info = TaskInfo(0, 2, "colors", batches=lambda: _batches(tokenization.tokenize_examples(task.train, tiny_tokenizer, spec),
                                                              0, spec), model=model)
    method = MIST(inner=SeqLoRA(sites=("q",)), sites=("attn.q", "mlp.wo"), fraction=0.1)
    state = method.init(jax.random.PRNGKey(0), model.site_shapes(), 2)
    scores = method.sensitivity(jax.random.PRNGKey(1), info, state)
    for site, score in scores.items():
        # The decoder's start-token state reaches the decoder's weights, except the q of its
        # self-attention: one token attends only to itself, so q (and k) get no gradient.
        if site == "decoder.self_attn.q":
            np.testing.assert_array_equal(score, 0.0)
        else:
            assert np.asarray(score).max() > 0, site
    state = method.begin_task(jax.random.PRNGKey(1), state, info, model.site_shapes())
    report = method.report(state)["mist"]
    np.testing.assert_allclose(report["mask_share_per_task"], [0.1], atol=1e-3)


def test_build_wraps_any_method_and_checks_mist_options():
    method, replay = methods.build("mist+olora", {"mist_fraction": 0.1, "mist_keep_prob": 0.2, "lambda1": 0.3})
    assert isinstance(method, MIST) and replay is None
    assert (method.fraction, method.keep_prob, method.inner.name, method.inner.lambda1) == (0.1, 0.2, "olora", 0.3)
    routed, _ = methods.build("mist+any_ssr", {})
    assert type(routed).route is not methods.Method.route
    assert type(method).route is methods.Method.route  # O-LoRA does not route, so neither does its MIST
    assert methods.build("mist+mtl", {})[0].joint
    for bad in ({"mist_fraction": "many"}, {"mist_inner": "x"}, {"mist_fraction": 1.5}):
        with pytest.raises(methods.MethodError, match="mist"):
            methods.build("mist+seq_lora", bad)


@pytest.mark.slow
def test_full_run_reports_mask_overlap_and_freezes_unselected_entries(tmp_path, stream_root, tiny_model):
    model, tok = tiny_model
    initial = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model))["layers"])
    cfg = jconfig.from_dict(tiny_config(stream_root, method="mist+olora",
                                        method_args={"mist_fraction": 0.1, "dropout": 0.0}))
    results = run(cfg, str(tmp_path), progress=False, model_and_tokenizer=(model, tok))
    report = results["method_report"]["mist"]
    overlap = np.array(report["mask_overlap"])
    assert overlap.shape == (3, 3)
    np.testing.assert_allclose(np.diag(overlap), 1.0)
    assert np.all(overlap[np.triu_indices(3, 1)] == 0) and np.all((overlap >= 0) & (overlap <= 1))
    np.testing.assert_allclose(report["mask_share_per_task"], 0.1, atol=1e-3)
    ckpt = Checkpointer(str(tmp_path))
    step, _ = ckpt.latest()
    final_base = ckpt.restore(step, "params")["base"]["layers"]
    selected = ckpt.restore(step, "fixed")["mist"]["selected"]
    ckpt.close()
    # the overlap matrix is what the stored masks say
    masks = [{s: np.asarray(current_mask(jnp.asarray(b), jnp.int32(t))) for s, b in selected.items()} for t in range(3)]
    for t in range(3):
        for s in range(t + 1):
            share = sum(int((masks[t][x] & masks[s][x]).sum()) for x in masks[t]) / sum(int(m.sum()) for m in masks[t].values())
            assert abs(overlap[t, s] - share) < 1e-5
    # backbone entries no task selected are bit-identical; some selected ones moved
    moved = 0
    for site, bits in selected.items():
        name = site_path(site).split("/")[1]
        union = np.asarray(bits) != 0
        np.testing.assert_array_equal(np.asarray(final_base[name])[~union], initial[name][~union], err_msg=site)
        moved += int((np.asarray(final_base[name]) != initial[name]).sum())
    assert moved > 0
    # the engine logs the share of site weights each step changed: inside (0, fraction]
    with open(tmp_path / "log.jsonl", encoding="utf-8") as f:
        changed = [r["base_changed"] for r in map(json.loads, f) if r["event"] == "step"]
    assert changed and all(0.0 <= c <= 0.1 + 1e-6 for c in changed) and max(changed) > 0, changed


def test_backbone_gets_its_own_sgd_while_the_inner_method_keeps_the_run_optimizer():
    params = {"method": {"a": jnp.ones(3)}, "base": {"layers": {"q": jnp.ones((2, 2))}}}
    grads = jax.tree.map(jnp.ones_like, params)
    own = MIST(inner=SeqLoRA(), backbone_lr=1e-2, backbone_momentum=0.5).optimizer(optax.sgd(0.5))
    state = own.init(params)
    for expected_base in (-1e-2, -1.5e-2):  # momentum: g, then 0.5 g + g
        updates, state = own.update(grads, state, params)
        np.testing.assert_allclose(updates["method"]["a"], -0.5, rtol=1e-6)
        np.testing.assert_allclose(updates["base"]["layers"]["q"], expected_base, rtol=1e-6)
    shared = MIST(inner=SeqLoRA(), backbone_lr=None).optimizer(optax.sgd(0.5))
    updates, _ = shared.update(grads, shared.init(params), params)
    np.testing.assert_allclose(updates["base"]["layers"]["q"], -0.5, rtol=1e-6)


@pytest.mark.slow
def test_mist_around_any_ssr_routes_and_tunes_the_backbone(tmp_path, stream_root, tiny_model):
    cfg = jconfig.from_dict(tiny_config(stream_root, method="mist+any_ssr",
                                        method_args={"expansion_dim": 64, "mist_fraction": 0.1}))
    results = run(cfg, str(tmp_path), progress=False, model_and_tokenizer=tiny_model)
    routing = np.array(results["routing_accuracy"])
    assert routing.shape == (3, 3) and np.all(routing[-1] >= 90.0)  # Any-SSR's router still routes
    assert results["method_report"]["expansion_dim"] == 64
    np.testing.assert_allclose(results["method_report"]["mist"]["mask_share_per_task"], 0.1, atol=1e-3)
    with open(tmp_path / "log.jsonl", encoding="utf-8") as f:
        changed = [r["base_changed"] for r in map(json.loads, f) if r["event"] == "step"]
    assert max(changed) > 0
