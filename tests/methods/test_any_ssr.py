"""Any-SSR on the tiny engine stream: closed-form router, per-example routing, gated LoRA layers, full run."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcl.data import batching, load_stream, tokenization
from jaxcl.methods import AnySSR, TaskInfo
from jaxcl.methods.any_ssr import auto_feature_layers
from jaxcl.train import config as jconfig
from jaxcl.train.checkpoint import Checkpointer
from jaxcl.train.loop import run

from tiny_cl import TASKS, tiny_config, tiny_llama

E = 48  # expansion width: small, but larger than the tiny model's d=32
BATCH = 8


@pytest.fixture(scope="module")
def stream(stream_root, tiny_tokenizer):
    """Tokenized train/test examples of the three tiny tasks, and the batch spec."""
    tasks = load_stream("cl_benchmark", list(TASKS), stream_root)
    spec = tokenization.make_batch_spec(tiny_tokenizer, "decoder", 48, 4, bucket_multiple=16)
    train = [tokenization.tokenize_examples(t.train, tiny_tokenizer, spec) for t in tasks]
    test = [tokenization.tokenize_examples(t.test, tiny_tokenizer, spec) for t in tasks]
    return train, test, spec


def _batches(rows, index, spec):
    """What ``TaskInfo.batches`` yields: training batches, the last one filled up with repeated rows."""
    def gen():
        for start in range(0, len(rows), BATCH):
            chunk = rows[start:start + BATCH]
            real = np.arange(BATCH) < len(chunk)
            chunk = chunk + [chunk[-1]] * (BATCH - len(chunk))
            b = batching.collate_train(chunk, real, spec)
            yield dict(b, task_ids=np.full(BATCH, index, np.int32), real=real)
    return gen


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
    train, _, spec = stream
    model = tiny_llama(len(tiny_tokenizer))
    method = AnySSR(expansion_dim=E, dropout=0.0, router_block_size=5)  # blocks straddle batches
    site_shapes = model.site_shapes()
    state = method.init(jax.random.PRNGKey(0), site_shapes, 3)
    history = []
    for t in range(3):
        info = TaskInfo(t, 3, batches=_batches(train[t], t, spec), model=model)
        state = method.begin_task(jax.random.PRNGKey(t + 1), state, info, site_shapes)
        history.append(("begun", state))
        state = method.end_task(state, info)
        history.append(("ended", state))
    return method, model, history


def test_router_after_each_task_equals_joint_ridge_on_all_tasks_so_far(fitted, stream):
    method, model, history = fitted
    train, _, _ = stream
    ended = [s for kind, s in history if kind == "ended"]
    w_fe = ended[0]["fixed"]["router"]["w_fe"]
    phi = [_reference_features(model, w_fe, [r.prompt for r in rows]) for rows in train]
    for t, state in enumerate(ended):
        router = state["fixed"]["router"]
        labels = np.concatenate([np.full(len(train[s]), s) for s in range(t + 1)])
        expected = _ridge(np.concatenate(phi[: t + 1]), labels, 3, method.gamma)
        got = np.asarray(router["W"], np.float64)
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-3
        np.testing.assert_array_equal(got[:, t + 1:], 0.0)  # unseen tasks' columns stay exactly zero
        np.testing.assert_array_equal(np.asarray(router["seen"]), np.arange(3) <= t)


def test_a_new_task_column_changes_no_old_score_until_its_data_is_fitted(fitted, stream):
    # Opening task t+1 (begin_task) leaves every seen task's router output as it was, and the new
    # column cannot win the argmax before its own data has been fitted.
    method, model, history = fitted
    _, test, spec = stream
    batch = batching.collate_eval([r for rows in test for r in rows[:3]], spec)
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "position_ids"}
    for (_, ended), (_, begun) in zip(history[1::2], history[2::2]):
        before = np.asarray(method.router_scores(model, ended, batch))
        after = np.asarray(method.router_scores(model, begun, batch))
        np.testing.assert_array_equal(before, after)
        seen = np.asarray(begun["fixed"]["router"]["seen"])
        assert np.all(np.isneginf(after[:, ~seen])) and np.all(np.isfinite(after[:, seen]))


def _with_random_loras(method, state, key):
    """Give the current LoRA and every past slot random non-zero ``a`` and ``b`` (as if trained)."""
    def fill(bank, k):
        return jax.tree.map(lambda x, kk: 0.3 * jax.random.normal(kk, x.shape), bank,
                            jax.tree.unflatten(jax.tree.structure(bank), jax.random.split(k, len(jax.tree.leaves(bank)))))
    k1, k2 = jax.random.split(key)
    return {"train": dict(state["train"], lora=fill(state["train"]["lora"], k1)),
            "fixed": dict(state["fixed"], past=fill(state["fixed"]["past"], k2))}


def _logits_fn(method):
    @nnx.jit
    def logits(model, state, ids, mask, ctx):
        return model(ids, mask, adapter=method.adapter(state, ctx))
    return logits


def test_routes_each_example_of_a_mixed_batch_and_applies_its_lora(fitted, stream):
    method, model, history = fitted
    _, test, spec = stream
    state = _with_random_loras(method, history[-1][1], jax.random.PRNGKey(7))
    rows = [t[i] for i in range(max(len(t) for t in test)) for t in test if i < len(t)]  # tasks interleaved
    truth = np.array([j for i in range(max(len(t) for t in test)) for j, t in enumerate(test) if i < len(t)])
    batch = {k: jnp.asarray(v) for k, v in batching.collate_eval(rows, spec).items() if k != "position_ids"}
    route_and_ctx = nnx.jit(lambda model, state, batch: (method.route(model, state, batch),
                                                         method.eval_ctx(model, state, batch, task=0)))
    picked, ctx = route_and_ctx(model, state, batch)
    picked = np.asarray(picked)
    reference = _reference_features(model, state["fixed"]["router"]["w_fe"], [r.prompt for r in rows])
    np.testing.assert_array_equal(picked, np.argmax(reference @ np.asarray(state["fixed"]["router"]["W"]), axis=1))
    assert len(set(picked.tolist())) == 3 and np.mean(picked == truth) >= 0.9

    # Each row of the mixed batch gets exactly the logits it gets alone with its routed LoRA.
    np.testing.assert_array_equal(np.argmax(np.asarray(ctx["task_weights"]), axis=1), picked)
    logits = _logits_fn(method)
    mixed = logits(model, state, batch["input_ids"], batch["attention_mask"], ctx)
    slots = state["fixed"]["router"]["W"].shape[1]
    for b in (0, 1, 2, len(rows) - 1):
        one = {k: v[b:b + 1] for k, v in batch.items()}
        alone_ctx = {"task_weights": jax.nn.one_hot(picked[b:b + 1], slots + 1)}
        alone = logits(model, state, one["input_ids"], one["attention_mask"], alone_ctx)
        keep = np.asarray(one["attention_mask"][0], bool)
        np.testing.assert_allclose(np.asarray(mixed[b])[keep], np.asarray(alone[0])[keep], rtol=1e-5, atol=1e-5)


def test_feature_extractor_layers_get_no_lora(fitted, stream):
    method, model, history = fitted
    _, test, spec = stream
    state = _with_random_loras(method, history[-1][1], jax.random.PRNGKey(3))
    depth = auto_feature_layers(model.config.num_hidden_layers)
    batch = {k: jnp.asarray(v) for k, v in batching.collate_eval(test[0][:4], spec).items() if k != "position_ids"}
    ctx = {"task_weights": jnp.ones((4, 4))}  # every LoRA of the bank on
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def hidden(model, lora, num_layers):
        s = {"train": dict(state["train"], lora=lora), "fixed": state["fixed"]}
        return model.hidden(ids, mask, num_layers=num_layers, final_norm=False, adapter=method.adapter(s, ctx))

    lora = state["train"]["lora"]
    plain = model.hidden(ids, mask, num_layers=depth, final_norm=False)
    adapted = nnx.jit(hidden, static_argnums=2)
    np.testing.assert_array_equal(np.asarray(adapted(model, lora, depth)), np.asarray(plain))
    assert not np.allclose(np.asarray(adapted(model, lora, None)), np.asarray(model.hidden(ids, mask, final_norm=False)))

    # and the gated layers' LoRA entries get exactly zero gradient, the others do not
    grads = nnx.jit(lambda model, lora: jax.grad(lambda l: jnp.sum(hidden(model, l, None) ** 2))(lora))(model, lora)
    for site, g in grads.items():
        for name in ("a", "b"):
            assert np.all(np.asarray(g[name][:depth]) == 0.0), (site, name)
            assert np.any(np.asarray(g[name][depth:]) != 0.0), (site, name)


def test_bad_options_are_refused():
    shapes = {"attn.q": (2, 32, 32), "attn.v": (2, 32, 16)}
    with pytest.raises(ValueError, match="feature_layers"):
        AnySSR(feature_layers=2).init(jax.random.PRNGKey(0), shapes, 3)
    with pytest.raises(ValueError, match="decoder-only"):
        AnySSR().init(jax.random.PRNGKey(0), {"encoder.self_attn.q": (2, 32, 32)}, 3)
    assert [auto_feature_layers(n) for n in (2, 30, 32, 80)] == [1, 4, 4, 10]


def test_full_run_reports_routing_accuracy_and_checkpoints_the_router(stream_root, tmp_path, tiny_model):
    cfg = jconfig.from_dict(tiny_config(
        stream_root, method="any_ssr", method_args={"expansion_dim": E}))
    results = run(cfg, str(tmp_path), model_and_tokenizer=tiny_model, progress=False)
    routing = np.array(results["routing_accuracy"])
    assert routing.shape == (3, 3)
    for i in range(3):
        assert np.all(routing[i, i + 1:] == 0.0)  # a task not seen yet cannot be routed to
    assert np.all(routing[-1] >= 90.0)  # the tiny tasks' prompts name their dataset
    assert results["method_report"]["feature_layers"] == 1 and results["method_report"]["expansion_dim"] == E

    ckpt = Checkpointer(str(tmp_path))
    step, _ = ckpt.latest()
    router = ckpt.restore(step, "fixed")["router"]
    ckpt.close()
    assert router["R"].shape == (E, E) and router["W"].shape == (E, 3)
    assert np.asarray(router["seen"]).all() and np.all(np.abs(np.asarray(router["W"])).sum(axis=0) > 0)
    assert os.path.exists(tmp_path / "results.json")
