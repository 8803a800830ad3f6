"""SMAT: θ = θ_pre where the mixed mask is zero, deterministic evaluation, Lagrangian ascent, the
temperature from the step context, the task embedding at evaluation, and a tiny run whose experts
end >= 95% sparse with some gates open and their deltas trained."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from jaxcl import methods
from jaxcl.kernels import sparse_experts
from jaxcl.methods import MethodState, ModelInfo, SMAT, StepContext
from jaxcl.methods import axes
from jaxcl.methods.features import prompt_mean
from jaxcl.methods.smat import SMATContext
from jaxcl.train import config as jconfig
from jaxcl.train.checkpoint import Checkpointer
from jaxcl.train.loop import run

from tiny_cl import task_info, tiny_config, tiny_stream

SHAPES = {"attn.q": (4, 8, 6), "attn.v": (4, 8, 4), "mlp.down": (4, 12, 8)}
MODEL = ModelInfo(SHAPES, {"attn.q": ("embed", "q_heads"), "attn.v": ("embed", "kv_heads"),
                           "mlp.down": ("mlp", "embed")}, 8, False)
SITES = ("attn.q", "attn.v", "mlp.down")
METHOD = SMAT(sites=SITES, num_experts=3, selector_dim=5)


def _state(seed, closed=0.7):
    """A state as after training: random δ, and a share ``closed`` of the gates pushed shut."""
    state = axes.values(METHOD.init(jax.random.PRNGKey(seed), MODEL, 2))
    rng = np.random.default_rng(seed)
    params = state.params
    delta = {s: jnp.asarray(rng.normal(size=d.shape), jnp.float32) for s, d in params.delta.items()}
    log_alpha = {s: jnp.asarray(np.where(rng.random(la.shape) < closed, sparse_experts.LOG_ALPHA_MIN, 3.0), jnp.float32)
                 for s, la in params.log_alpha.items()}
    features = jnp.asarray(rng.normal(size=state.fixed.features.shape), jnp.float32)
    fixed = state.fixed._replace(features=features, seen=jnp.ones(2, bool))
    return MethodState(params._replace(delta=delta, log_alpha=log_alpha), fixed)


@jax.jit
def _weights_and_masks(state, ctx, key, weight):
    """Per site, the weight every layer sees — ``(L, d_in, d_out)`` (eval, ``key`` None) or
    ``(L, B, d_in, d_out)`` (train) — and the mixed mask m, recomputed from the randomness the
    adapter draws."""
    adapter = METHOD.adapter(state, ctx, key)
    seen = {site: jnp.stack([adapter.hook.weight_fn(site, jax.tree.map(lambda a: a[l], p), weight[site][l], ctx)
                             for l in range(SHAPES[site][0])]) for site, p in adapter.params.items()}
    sites = sorted(state.params.delta)  # the adapter's order of the sites (and of their keys)
    keys = [None] * (len(sites) + 1) if key is None else list(jax.random.split(key, len(sites) + 1))
    s = METHOD.expert_weights(state.params, ctx.features, ctx.tau, keys[-1])
    masks = {site: sparse_experts.interpolate(METHOD.gates(state.params, site, k), s if key is not None else s[0])
             for site, k in zip(sites, keys)}
    return seen, masks


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10**6), train=st.booleans())
def test_weight_is_pretrained_exactly_where_the_mixed_mask_is_zero(seed, train):
    state = _state(seed)
    batch = {"task_ids": jnp.array([0, 1, 0])}
    ctx = METHOD.train_ctx(None, state, batch, StepContext.start(1, 10, 7))
    rng = np.random.default_rng(seed + 1)
    weight = {s: jnp.asarray(rng.normal(size=SHAPES[s]), jnp.float32) for s in SITES}
    seen, masks = _weights_and_masks(state, ctx, jax.random.PRNGKey(seed + 7) if train else None, weight)
    for site in SITES:
        m = np.asarray(masks[site])
        lower = SHAPES[site][0] - m.shape[-3]
        assert lower == 2  # first_layer 0.5 of 4 layers
        w, got = np.asarray(weight[site]), np.asarray(seen[site])
        if train:
            got = np.moveaxis(got, 1, 0)  # (B, L, d_in, d_out)
            w = np.broadcast_to(w, got.shape)
        np.testing.assert_array_equal(got[..., :lower, :, :], w[..., :lower, :, :])  # lower layers: untouched
        upper_got, upper_w = got[..., lower:, :, :], w[..., lower:, :, :]
        assert (m == 0).any() and (m > 0).any()  # both cases occur, so both checks below bite
        np.testing.assert_array_equal(upper_got[m == 0], upper_w[m == 0])
        expected = upper_w + m * np.asarray(state.params.delta[site])
        np.testing.assert_allclose(upper_got, expected, rtol=1e-6, atol=1e-6)


def test_evaluation_is_deterministic_and_training_is_not():
    state = _state(3)
    ctx = SMATContext(state.fixed.features[jnp.array([1, 1])], METHOD.tau(state.fixed.steps))
    evaluate = jax.jit(lambda st, c: METHOD.adapter(st, c, None).params)
    train = jax.jit(lambda st, c, k: METHOD.adapter(st, c, k).params)
    a, b = (evaluate(state, ctx) for _ in range(2))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    s1, s2 = (train(state, ctx, jax.random.PRNGKey(i)) for i in range(2))
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)))
    # the evaluation gates are the kernel's noise-free gates: every entry exactly 0 or (here) 1
    gates = METHOD.gates(state.params, "attn.q")
    np.testing.assert_array_equal(gates, sparse_experts.hard_concrete(None, state.params.log_alpha["attn.q"],
                                                                      train=False))
    assert set(np.unique(np.asarray(gates))) == {0.0, 1.0}


def test_lagrange_multipliers_ascend_while_experts_are_too_dense_and_post_update_clamps_the_gates():
    state = _state(5, closed=0.0)  # every gate open: density far above 1 − 0.95
    step = StepContext.start(0, 10, 0)
    grads = jax.grad(lambda p: METHOD.extra_loss(None, MethodState(p, state.fixed), {}, step))(state.params)
    density = np.asarray(METHOD.expected_density(state.params))
    assert np.all(density > 0.9)
    np.testing.assert_allclose(grads.lagrange.linear, density - 0.05, rtol=1e-5)
    np.testing.assert_allclose(grads.lagrange.quadratic, (density - 0.05) ** 2, rtol=1e-5)
    out = METHOD.transform_grads({"method": grads, "base": {}}, state, jax.random.PRNGKey(0), step)["method"]
    np.testing.assert_allclose(out.lagrange.linear, -(density - 0.05), rtol=1e-5)  # ascent
    # ... while the gates themselves are pushed shut by the same term (descent, unchanged)
    for site in SITES:
        np.testing.assert_array_equal(out.log_alpha[site], grads.log_alpha[site])
    wild = state.params._replace(log_alpha={s: 1e3 * jax.random.normal(jax.random.PRNGKey(i), x.shape)
                                              for i, (s, x) in enumerate(state.params.log_alpha.items())})
    after = METHOD.post_update(MethodState(wild, state.fixed), step).params
    for site in SITES:
        la = np.asarray(after.log_alpha[site])
        assert la.min() == np.float32(sparse_experts.LOG_ALPHA_MIN) and la.max() == np.float32(sparse_experts.LOG_ALPHA_MAX)


def test_the_temperature_follows_the_step_context_and_no_trainable_leaf_counts_steps():
    state = _state(0)
    batch = {"task_ids": jnp.array([0, 1])}
    method = SMAT(sites=SITES, num_experts=3, selector_dim=5, tau_start=5.0, tau_min=0.5, tau_steps=100.0)
    taus = [float(method.train_ctx(None, state, batch, StepContext.start(1, 10, total, step=3)).tau)
            for total in (0, 150, 1000)]
    np.testing.assert_allclose(taus, [5.0, 3.5, 0.5], rtol=1e-6)
    # every trainable leaf is a float the optimizer moves; none is an integer counter
    assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(state.params))
    # evaluation uses τ at the last step trained, stored at end_task from TaskInfo.total_steps
    # (the support-embedding test below checks that eval_ctx uses method.tau(fixed.steps))
    ended = method.end_task(state, methods.TaskInfo(0, 2, "t", total_steps=150))
    assert int(ended.fixed.steps) == 150
    np.testing.assert_allclose(float(method.tau(ended.fixed.steps)), 3.5, rtol=1e-6)


def test_eval_uses_the_support_embedding_of_seen_tasks_and_the_batch_for_unseen_ones(stream_root, tiny_model):
    model, tok = tiny_model
    stream = tiny_stream(stream_root, tok)
    method = SMAT(support_size=5)
    state = axes.values(method.init(jax.random.PRNGKey(0), ModelInfo.of(model), 3))
    state = method.begin_task(jax.random.PRNGKey(1), state, task_info(stream, 0, model))
    # the stored embedding input: unit mean of the first 5 examples' unit prompt means
    means_of = nnx.jit(prompt_mean)
    first = next(stream.task_batches([0]))
    prompt = (first["attention_mask"] > 0) & ~(first["loss_mask"] > 0)
    means = np.asarray(means_of(model, jnp.asarray(first["input_ids"]), jnp.asarray(prompt)))[:5]
    support = (means / np.linalg.norm(means, axis=1, keepdims=True)).mean(0)
    np.testing.assert_allclose(state.fixed.features[0], support / np.linalg.norm(support), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state.fixed.seen, [True, False, False])

    eval_ctx = nnx.jit(lambda m, st, b: method.eval_ctx(m, st, b))
    _, _, test_batch = next(q for q in stream.eval_queue() if q[0] == 1)
    test_batch = {k: jnp.asarray(v) for k, v in test_batch.items()}
    seen = np.asarray(eval_ctx(model, state, dict(test_batch, task_ids=jnp.zeros_like(test_batch["task_ids"]))).features)
    np.testing.assert_array_equal(seen, np.broadcast_to(state.fixed.features[0], seen.shape))
    unseen = np.asarray(eval_ctx(model, state, test_batch).features)
    means = np.asarray(means_of(model, test_batch["input_ids"], test_batch["attention_mask"] > 0))
    own = (means / np.linalg.norm(means, axis=1, keepdims=True)).mean(0)
    np.testing.assert_allclose(unseen, np.broadcast_to(own / np.linalg.norm(own), unseen.shape), rtol=1e-5, atol=1e-6)
    assert not np.allclose(unseen, seen, atol=1e-3)
    ended = method.end_task(state, task_info(stream, 0, model, total_steps=4000))
    np.testing.assert_allclose(float(eval_ctx(model, ended, test_batch).tau), method.tau_start - 1.0, rtol=1e-6)


def test_build_turns_on_replay_for_episodic_training():
    method = methods.build("smat", {"num_experts": 4, "replay_fraction": 0.5})
    assert isinstance(method, SMAT) and method.num_experts == 4 and method.replay.fraction == 0.5
    assert methods.build("smat", {}).replay == methods.ReplaySpec(0.2, 50)
    with pytest.raises(methods.MethodError, match="sparsity"):
        methods.build("smat", {"sparsity": 1.5})


@pytest.mark.slow
def test_tiny_run_makes_every_expert_at_least_95_percent_sparse_with_open_gates_that_trained(
        tmp_path, stream_root, tiny_model):
    model, tok = tiny_model
    cfg = jconfig.from_dict(tiny_config(stream_root, method="smat", train={"steps_per_task": 10}))
    results = run(cfg, str(tmp_path), progress=False, model_and_tokenizer=(model, tok))
    report = results["method_report"]
    assert report["steps"] == 30 and len(report["sparsity_per_expert"]) == 8
    sparsity = np.array(report["sparsity_per_expert"])
    assert sparsity.min() >= 0.95, sparsity
    assert sparsity.max() < 1.0, sparsity  # every expert keeps some gates open: not a collapse to θ_pre
    assert sorted(report["expert_weights_per_task"]) == ["0", "1", "2"]
    for weights in report["expert_weights_per_task"].values():
        np.testing.assert_allclose(sum(weights), 1.0, atol=1e-3)
    assert np.array(results["matrix"]).shape == (3, 3)
    # the open gates sit on deltas that training moved, so the evaluated weights differ from θ_pre
    ckpt = Checkpointer(str(tmp_path))
    step, _ = ckpt.latest()
    params = ckpt.restore(step, "params")["method"]
    ckpt.close()
    moved = 0
    for site, delta in params["delta"].items():
        gates = np.asarray(sparse_experts.hard_concrete(None, jnp.asarray(params["log_alpha"][site]), train=False))
        moved += int(np.sum((gates != 0) & (np.asarray(delta)[None] != 0)))
    assert moved > 0
