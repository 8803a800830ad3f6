"""Any-SSR on the tiny engine stream: closed-form router, per-example routing, gated LoRA layers, full run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcl.data import batching
from jaxcl.methods import AnySSR, ModelInfo
from jaxcl.methods import axes
from jaxcl.methods.any_ssr import auto_feature_layers
from jaxcl.methods.lora_bank import Current
from jaxcl.train import config as jconfig
from jaxcl.train.loop import run

from tiny_cl import task_info, tiny_config, tiny_llama, tiny_stream

E = 48  # expansion width: small, but larger than the tiny model's d=32


@pytest.fixture(scope="module")
def stream(stream_root, tiny_tokenizer):
    return tiny_stream(stream_root, tiny_tokenizer)


def _reference_features(model, w_fe, prompts):
    """φ of each prompt run alone (no padding, no answer): mean over its tokens, final norm, expansion.

    Prompts of equal length go through the model together (no padding needed)."""
    depth = auto_feature_layers(model.config.num_hidden_layers)

    @nnx.jit
    def features(model, ids):
        h = model.hidden(ids, num_layers=depth, final_norm=False)
        return model.final_norm(h.mean(axis=1)) @ w_fe

    out = np.zeros((len(prompts), w_fe.shape[1]))
    for length in {len(p) for p in prompts}:
        idx = [i for i, p in enumerate(prompts) if len(p) == length]
        out[idx] = np.asarray(features(model, jnp.asarray(np.stack([prompts[i] for i in idx]))))
    return out


def _ridge(phi, labels, num_tasks, gamma):
    y = np.eye(num_tasks)[labels]
    return np.linalg.solve(phi.T @ phi + gamma * np.eye(phi.shape[1]), phi.T @ y)


@pytest.fixture(scope="module")
def fitted(stream, tiny_tokenizer):
    """The router state after each of the three tasks (end_task with the tiny model, no LoRA training)."""
    model = tiny_llama(len(tiny_tokenizer))
    method = AnySSR(expansion_dim=E, dropout=0.0, router_block_size=5)  # blocks straddle batches
    state = axes.values(method.init(jax.random.PRNGKey(0), ModelInfo.of(model), 3))
    history = []
    for t in range(3):
        info = task_info(stream, t, model)
        state = method.begin_task(jax.random.PRNGKey(t + 1), state, info)
        history.append(("begun", state))
        state = method.end_task(state, info)
        history.append(("ended", state))
    return method, model, history


def test_router_after_each_task_equals_joint_ridge_on_all_tasks_so_far(fitted, stream):
    method, model, history = fitted
    ended = [s for kind, s in history if kind == "ended"]
    w_fe = ended[0].fixed.router.w_fe
    phi = [_reference_features(model, w_fe, [r.prompt for r in task.train]) for task in stream.tasks]
    for t, state in enumerate(ended):
        router = state.fixed.router
        labels = np.concatenate([np.full(len(stream.tasks[s].train), s) for s in range(t + 1)])
        expected = _ridge(np.concatenate(phi[: t + 1]), labels, 3, method.gamma)
        got = np.asarray(router.W, np.float64)
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-3
        np.testing.assert_array_equal(got[:, t + 1:], 0.0)  # unseen tasks' columns stay exactly zero
        np.testing.assert_array_equal(np.asarray(router.seen), np.arange(3) <= t)


def _mixed_test_batch(stream, per_task=None):
    """One left-padded evaluation batch of every task's test prompts, the tasks interleaved."""
    tests = [t.test if per_task is None else t.test[:per_task] for t in stream.tasks]
    longest = max(len(t) for t in tests)
    order = [(j, i) for i in range(longest) for j, t in enumerate(tests) if i < len(t)]
    rows = [tests[j][i] for j, i in order]
    batch = batching.collate_eval(rows, stream.spec, (stream.prompt_length,))
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "position_ids"}, rows, np.array([j for j, _ in order])


def test_a_new_task_column_changes_no_old_score_until_its_data_is_fitted(fitted, stream):
    # Opening task t+1 (begin_task) leaves every seen task's router output as it was, and the new
    # column cannot win the argmax before its own data has been fitted.
    method, model, history = fitted
    batch, _, _ = _mixed_test_batch(stream, per_task=3)
    for (_, ended), (_, begun) in zip(history[1::2], history[2::2]):
        before = np.asarray(method.router_scores(model, ended, batch))
        after = np.asarray(method.router_scores(model, begun, batch))
        np.testing.assert_array_equal(before, after)
        seen = np.asarray(begun.fixed.router.seen)
        assert np.all(np.isneginf(after[:, ~seen])) and np.all(np.isfinite(after[:, seen]))


def _with_random_loras(state, key):
    """Give the current LoRA and every past slot random non-zero ``a`` and ``b`` (as if trained)."""
    def fill(bank, k):
        leaves, tree = jax.tree.flatten(bank)
        return jax.tree.unflatten(tree, [0.3 * jax.random.normal(kk, x.shape)
                                         for x, kk in zip(leaves, jax.random.split(k, len(leaves)))])
    k1, k2 = jax.random.split(key)
    return state._replace(params=Current(fill(state.params.lora, k1)),
                          fixed=state.fixed._replace(past=fill(state.fixed.past, k2)))


def test_routes_each_example_of_a_mixed_batch_and_applies_its_lora(fitted, stream):
    method, model, history = fitted
    state = _with_random_loras(history[-1][1], jax.random.PRNGKey(7))
    batch, rows, truth = _mixed_test_batch(stream)
    route_and_ctx = nnx.jit(lambda model, state, batch: (method.route(model, state, batch),
                                                         method.eval_ctx(model, state, batch)))
    picked, ctx = route_and_ctx(model, state, batch)
    picked = np.asarray(picked)
    reference = _reference_features(model, state.fixed.router.w_fe, [r.prompt for r in rows])
    np.testing.assert_array_equal(picked, np.argmax(reference @ np.asarray(state.fixed.router.W), axis=1))
    # the tiny tasks' prompts name their dataset: the router gets (almost) every prompt right
    assert np.mean(picked == truth) >= 0.9, (picked, truth)

    # Each row of the mixed batch gets exactly the logits it gets alone with its routed LoRA, and the
    # current LoRA's column is never picked at evaluation.
    np.testing.assert_array_equal(np.argmax(np.asarray(ctx), axis=1), picked)
    np.testing.assert_array_equal(np.asarray(ctx)[:, -1], 0.0)
    logits = nnx.jit(lambda model, state, ids, mask, ctx: model(ids, mask, adapter=method.adapter(state, ctx)))
    mixed = logits(model, state, batch["input_ids"], batch["attention_mask"], ctx)
    for b in (0, 1, 2, len(rows) - 1):
        alone = logits(model, state, batch["input_ids"][b:b + 1], batch["attention_mask"][b:b + 1], ctx[b:b + 1])
        keep = np.asarray(batch["attention_mask"][b], bool)
        np.testing.assert_allclose(np.asarray(mixed[b])[keep], np.asarray(alone[0])[keep], rtol=1e-5, atol=1e-5)


def test_feature_extractor_layers_get_no_lora(fitted, stream):
    method, model, history = fitted
    state = _with_random_loras(history[-1][1], jax.random.PRNGKey(3))
    depth = auto_feature_layers(model.config.num_hidden_layers)
    assert method.frozen_below(model.config.num_hidden_layers) == depth == 1
    batch, _, _ = _mixed_test_batch(stream, per_task=2)
    ctx = jnp.ones((batch["input_ids"].shape[0], 4))  # every LoRA of the bank on
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def hidden(model, lora, num_layers):
        s = state._replace(params=Current(lora))
        return model.hidden(ids, mask, num_layers=num_layers, final_norm=False, adapter=method.adapter(s, ctx))

    lora = state.params.lora
    plain = model.hidden(ids, mask, num_layers=depth, final_norm=False)
    adapted = nnx.jit(hidden, static_argnums=2)
    np.testing.assert_array_equal(np.asarray(adapted(model, lora, depth)), np.asarray(plain))
    assert not np.allclose(np.asarray(adapted(model, lora, None)), np.asarray(model.hidden(ids, mask, final_norm=False)))

    # and the gated layers' LoRA entries get exactly zero gradient, the others do not
    grads = nnx.jit(lambda model, lora: jax.grad(lambda l: jnp.sum(hidden(model, l, None) ** 2))(lora))(model, lora)
    for site, g in grads.items():
        for name in ("a", "b"):
            assert np.all(np.asarray(getattr(g, name)[:depth]) == 0.0), (site, name)
            assert np.any(np.asarray(getattr(g, name)[depth:]) != 0.0), (site, name)
    assert method.report(state)["lora_params_per_task"] == sum(l.a[0].size + l.b[0].size for l in lora.values())


def test_bad_options_are_refused():
    shapes = ModelInfo({"attn.q": (2, 32, 32), "attn.v": (2, 32, 16)}, {"attn.q": ("embed", "q_heads"),
                                                                        "attn.v": ("embed", "kv_heads")}, 32, False)
    with pytest.raises(ValueError, match="feature_layers=2 leaves no layer"):
        AnySSR(feature_layers=2).init(jax.random.PRNGKey(0), shapes, 3)
    with pytest.raises(ValueError, match="decoder-only"):
        AnySSR().init(jax.random.PRNGKey(0), shapes._replace(encoder_decoder=True), 3)
    assert [auto_feature_layers(n) for n in (2, 30, 32, 80)] == [1, 4, 4, 10]


@pytest.mark.slow
def test_full_run_reports_routing_accuracy(stream_root, tmp_path, tiny_model):
    cfg = jconfig.from_dict(tiny_config(stream_root, method="any_ssr", method_args={"expansion_dim": E}))
    results = run(cfg, str(tmp_path), model_and_tokenizer=tiny_model, progress=False)
    routing = np.array(results["routing_accuracy"])
    assert routing.shape == (3, 3)
    for i in range(3):
        assert np.all(routing[i, i + 1:] == 0.0)  # a task not seen yet cannot be routed to
    np.testing.assert_array_equal(routing[0], [100.0, 0.0, 0.0])  # one task seen: all prompts go to it
    assert np.all(routing[-1] >= 90.0)  # the tiny tasks' prompts name their dataset
    assert results["method_report"]["feature_layers"] == 1 and results["method_report"]["expansion_dim"] == E
