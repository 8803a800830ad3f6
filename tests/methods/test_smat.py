"""SMAT: θ = θ_pre where the mixed mask is zero, deterministic evaluation, Lagrangian ascent, the
task embedding at evaluation, and every expert ≥ 95% sparse after a tiny run."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from jaxcl import methods
from jaxcl.data import batching, load_stream, tokenization
from jaxcl.kernels import sparse_experts
from jaxcl.methods import SMAT, TaskInfo
from jaxcl.methods.mist import prompt_mean
from jaxcl.train import config as jconfig
from jaxcl.train.loop import run

from tiny_cl import TASKS, tiny_config

SHAPES = {"attn.q": (4, 8, 6), "attn.v": (4, 8, 4), "mlp.down": (4, 12, 8)}
SITES = ("attn.q", "attn.v", "mlp.down")
METHOD = SMAT(sites=SITES, num_experts=3, selector_dim=5)


def _state(seed, closed=0.7):
    """A state as after training: random δ, and a share ``closed`` of the gates pushed shut."""
    method = METHOD
    state = method.init(jax.random.PRNGKey(seed), SHAPES, 2)
    rng = np.random.default_rng(seed)
    train = state["train"]
    delta = {s: jnp.asarray(rng.normal(size=d.shape), jnp.float32) for s, d in train["delta"].items()}
    log_alpha = {s: jnp.asarray(np.where(rng.random(la.shape) < closed, sparse_experts.LOG_ALPHA_MIN, 3.0)
                                / method.mask_lr_scale, jnp.float32) for s, la in train["log_alpha"].items()}
    features = jnp.asarray(rng.normal(size=state["fixed"]["features"].shape), jnp.float32)
    fixed = dict(state["fixed"], features=features, seen=jnp.ones(2))
    return method, {"train": dict(train, delta=delta, log_alpha=log_alpha), "fixed": fixed}


@functools.partial(jax.jit, static_argnames="train")
def _weights_and_masks(state, ctx, key, weight, train):
    """Per site, the weight every layer sees — ``(L, d_in, d_out)`` (eval) or ``(L, B, d_in, d_out)``
    (train) — and the mixed mask m, recomputed from the randomness the adapter draws."""
    key = key if train else None
    adapter = METHOD.adapter(state, ctx, key)
    seen = {}
    for site, p in adapter.params.items():
        seen[site] = jnp.stack([adapter.hook.weight_fn(site, jax.tree.map(lambda a: a[l], p), weight[site][l], ctx)
                                for l in range(SHAPES[site][0])])
    sites = list(state["train"]["delta"])  # the adapter's order of the sites (and of their keys)
    keys = [None] * (len(sites) + 1) if key is None else list(jax.random.split(key, len(sites) + 1))
    s = METHOD.expert_weights(state["train"], ctx["features"], keys[-1])
    masks = {site: sparse_experts.interpolate(METHOD.gates(state["train"], site, k), s if train else s[0])
             for site, k in zip(sites, keys)}
    return seen, masks


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10**6), train=st.booleans())
def test_weight_is_pretrained_exactly_where_the_mixed_mask_is_zero(seed, train):
    method, state = _state(seed)
    ctx = {"features": state["fixed"]["features"][jnp.array([0, 1, 0])]}
    rng = np.random.default_rng(seed + 1)
    weight = {s: jnp.asarray(rng.normal(size=SHAPES[s]), jnp.float32) for s in SITES}
    seen, masks = _weights_and_masks(state, ctx, jax.random.PRNGKey(seed + 7), weight, train)
    for site in SITES:
        m = masks[site]
        lower = SHAPES[site][0] - m.shape[-3]
        w, got = np.asarray(weight[site]), np.asarray(seen[site])
        if train:
            got = np.moveaxis(got, 1, 0)  # (B, L, d_in, d_out)
            w = np.broadcast_to(w, got.shape)
        np.testing.assert_array_equal(got[..., :lower, :, :], w[..., :lower, :, :])  # lower layers: untouched
        upper_got, upper_w, m = got[..., lower:, :, :], w[..., lower:, :, :], np.asarray(m)
        assert (m == 0).any() and (m > 0).any()  # both cases occur, so both checks below bite
        np.testing.assert_array_equal(upper_got[m == 0], upper_w[m == 0])
        expected = upper_w + m * np.asarray(state["train"]["delta"][site])
        np.testing.assert_allclose(upper_got, expected, rtol=1e-6, atol=1e-6)


def test_evaluation_is_deterministic_and_training_is_not():
    method, state = _state(3)
    ctx = {"features": state["fixed"]["features"][jnp.array([1, 1])]}
    evaluate = jax.jit(lambda st, c: method.adapter(st, c, None).params)
    train = jax.jit(lambda st, c, k: method.adapter(st, c, k).params)
    a, b = (evaluate(state, ctx) for _ in range(2))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    s1, s2 = (train(state, ctx, jax.random.PRNGKey(i)) for i in range(2))
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)))
    # the evaluation gates are the kernel's noise-free gates: every entry exactly 0 or (here) 1
    gates = method.gates(state["train"], "attn.q")
    np.testing.assert_array_equal(gates, sparse_experts.hard_concrete(
        None, method.log_alpha(state["train"], "attn.q"), train=False))
    assert set(np.unique(np.asarray(gates))) <= {0.0, 1.0}


def test_lagrange_multipliers_ascend_while_experts_are_too_dense():
    method, state = _state(5, closed=0.0)  # every gate open: density far above 1 − 0.95
    params = state["train"]
    grads = jax.grad(lambda p: method.extra_loss({"train": p, "fixed": state["fixed"]}, None))(params)
    density = method.expected_density(params)
    assert np.all(np.asarray(density) > 0.05)
    np.testing.assert_allclose(grads["lagrange"]["linear"], method.lagrangian_lr_scale * (density - 0.05), rtol=1e-5)
    out = method.transform_grads({"method": grads, "base": {}}, state, jax.random.PRNGKey(0))["method"]
    assert np.all(np.asarray(out["lagrange"]["linear"]) < 0) and np.all(np.asarray(out["lagrange"]["quadratic"]) < 0)
    # ... while the gates themselves are pushed shut by the same term (descent)
    for site in SITES:
        np.testing.assert_array_equal(out["log_alpha"][site], grads["log_alpha"][site])
    # post_update clamps the gate log-odds and counts the step
    wild = dict(params, log_alpha=jax.tree.map(lambda x: x * 1e3, params["log_alpha"]))
    after = method.post_update({"train": wild, "fixed": state["fixed"]})["train"]
    for site in SITES:
        la = np.asarray(method.log_alpha(after, site))
        assert la.min() >= sparse_experts.LOG_ALPHA_MIN - 1e-5 and la.max() <= sparse_experts.LOG_ALPHA_MAX + 1e-5
    assert float(after["step"]) == float(params["step"]) + 1


def test_eval_uses_the_support_embedding_of_seen_tasks_and_the_batch_for_unseen_ones(stream_root, tiny_model):
    model, tok = tiny_model
    tasks = load_stream("cl_benchmark", list(TASKS), stream_root)
    spec = tokenization.make_batch_spec(tok, "decoder", 48, 4, bucket_multiple=16)
    rows = tokenization.tokenize_examples(tasks[0].train, tok, spec)

    def batches():
        for start in range(0, len(rows), 8):
            chunk = rows[start:start + 8]
            b = batching.collate_train(chunk + [chunk[-1]] * (8 - len(chunk)), np.arange(8) < len(chunk), spec)
            yield dict(b, task_ids=np.zeros(8, np.int32), real=np.arange(8) < len(chunk))

    method = SMAT(support_size=5)
    means_of = nnx.jit(prompt_mean)
    eval_ctx = nnx.jit(lambda m, st, b, t: method.eval_ctx(m, st, b, t))
    state = method.init(jax.random.PRNGKey(0), model.site_shapes(), 3)
    state = method.begin_task(jax.random.PRNGKey(1), state, TaskInfo(0, 3, batches=batches, model=model),
                              model.site_shapes())
    # the stored embedding input: unit mean of the first 5 examples' unit prompt means
    first = next(batches())
    prompt = (first["attention_mask"] > 0) & ~(first["loss_mask"] > 0)
    means = np.asarray(means_of(model, jnp.asarray(first["input_ids"]), jnp.asarray(prompt)))[:5]
    support = (means / np.linalg.norm(means, axis=1, keepdims=True)).mean(0)
    np.testing.assert_allclose(state["fixed"]["features"][0], support / np.linalg.norm(support), rtol=1e-5, atol=1e-6)
    test_batch = next(b for _, b in batching.eval_batches(tokenization.tokenize_examples(tasks[1].test, tok, spec), 4, spec))
    seen = eval_ctx(model, state, test_batch, jnp.int32(0))["features"]
    np.testing.assert_array_equal(seen, np.broadcast_to(state["fixed"]["features"][0], seen.shape))
    unseen = np.asarray(eval_ctx(model, state, test_batch, jnp.int32(1))["features"])
    means = np.asarray(means_of(model, jnp.asarray(test_batch["input_ids"]), jnp.asarray(test_batch["attention_mask"] > 0)))
    own = (means / np.linalg.norm(means, axis=1, keepdims=True)).mean(0)
    np.testing.assert_allclose(unseen, np.broadcast_to(own / np.linalg.norm(own), unseen.shape), rtol=1e-5, atol=1e-6)


def test_build_turns_on_replay_for_episodic_training():
    method, replay = methods.build("smat", {"num_experts": 4, "replay_fraction": 0.5})
    assert isinstance(method, SMAT) and method.num_experts == 4 and replay.fraction == 0.5
    assert methods.build("smat", {})[1] is not None
    with pytest.raises(methods.MethodError, match="sparsity"):
        methods.build("smat", {"sparsity": 1.5})


@pytest.mark.slow
def test_tiny_run_makes_every_expert_at_least_95_percent_sparse(tmp_path, stream_root, tiny_model):
    model, tok = tiny_model
    cfg = jconfig.from_dict(tiny_config(stream_root, method="smat", train={"steps_per_task": 10}))
    results = run(cfg, str(tmp_path), progress=False, model_and_tokenizer=(model, tok))
    report = results["method_report"]
    assert report["steps"] == 30 and len(report["sparsity_per_expert"]) == 8
    assert min(report["sparsity_per_expert"]) >= 0.95, report["sparsity_per_expert"]
    assert sorted(report["expert_weights_per_task"]) == ["0", "1", "2"]
    for weights in report["expert_weights_per_task"].values():
        np.testing.assert_allclose(sum(weights), 1.0, atol=1e-3)
    assert np.array(results["matrix"]).shape == (3, 3)
