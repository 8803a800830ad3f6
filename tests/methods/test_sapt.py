"""SAPT: attention over the tasks seen so far, what trains, the reflection loss, pooling, mixing, runs."""
import dataclasses
import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from jaxcl.kernels import lora as lora_kernel
from jaxcl.methods import SAPT, TaskInfo, build
from jaxcl.methods.sapt import T5_SITES, common_prefix, input_mask, pool_embeddings
from jaxcl.train import config as jconfig, step as jstep
from jaxcl.train.loop import run

from tiny_cl import tiny_config, tiny_llama, tiny_t5


SHAPES = {"attn.q": (2, 16, 12), "attn.v": (2, 16, 8)}
VOCAB = 40


def _fake_model(seed=0, vocab=VOCAB, d=16):
    """What begin_task reads from TaskInfo.model when no forward pass is needed: the embedding table."""
    table = jax.random.normal(jax.random.PRNGKey(seed), (vocab, d))
    return types.SimpleNamespace(is_encoder_decoder=False, embed=table)


def _state_at(method, num_tasks, current, seed, model=None):
    state = method.init(jax.random.PRNGKey(seed), SHAPES, num_tasks)
    info = TaskInfo(current, num_tasks, model=model or _fake_model(seed))
    return method.begin_task(jax.random.PRNGKey(seed + 1), state, info, SHAPES)


def _random_batch(rng, batch, length, vocab=VOCAB, train=True):
    ids = rng.integers(4, vocab, (batch, length)).astype(np.int32)
    n_tokens = rng.integers(2, length + 1, batch)
    mask = (np.arange(length)[None] < n_tokens[:, None]).astype(np.int32)
    out = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    if train:  # the last token of each row is its answer
        out["loss_mask"] = jnp.asarray((np.arange(length)[None] == n_tokens[:, None] - 1).astype(np.float32))
    return out


# -- attention over seen tasks ----------------------------------------------------------------
# Few distinct shapes: every new shape compiles the eager ops again.
@settings(max_examples=12, deadline=None)
@given(num_tasks=st.sampled_from((1, 4)), data=st.data(), seed=st.integers(0, 10**6))
def test_attention_sums_to_one_over_seen_tasks_and_is_zero_on_unseen(num_tasks, data, seed):
    batch = 3
    current = data.draw(st.integers(0, num_tasks - 1))
    method = SAPT()
    state = _state_at(method, num_tasks, current, seed)
    rng = np.random.default_rng(seed)
    train_batch = _random_batch(rng, batch, 7)
    model = _fake_model(seed)
    w = np.asarray(method.train_ctx(model, state, train_batch)["task_weights"])
    assert w.shape == (batch, num_tasks + 1)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
    assert (w[:, current:num_tasks] == 0).all()  # own slot still empty: its weight is in the last column
    assert (w[:, num_tasks] > 0).all() and (w[:, :current] > 0).all()

    eval_batch = _random_batch(rng, batch, 7, train=False)
    w = np.asarray(method.eval_ctx(model, state, eval_batch, task=0)["task_weights"])
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
    assert (w[:, current + 1:] == 0).all() and (w[:, : current + 1] > 0).all()
    picked = np.asarray(method.route(model, state, eval_batch))
    assert ((0 <= picked) & (picked <= current)).all()


# -- pooling ----------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(batch=st.sampled_from((1, 4)), length=st.sampled_from((2, 9)), seed=st.integers(0, 10**6))
def test_max_pool_ignores_padding_and_answer_tokens(batch, length, seed):
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.standard_normal((VOCAB, 8)), jnp.float32)
    b = _random_batch(rng, batch, length)
    mask = np.asarray(input_mask(b))
    e = np.asarray(pool_embeddings(table, b["input_ids"], mask))
    ids, t = np.asarray(b["input_ids"]), np.asarray(table)
    for r in range(batch):
        prompt = ids[r][np.asarray(b["attention_mask"])[r].astype(bool) & (np.asarray(b["loss_mask"])[r] == 0)]
        expected = t[prompt].max(axis=0) if prompt.size else np.zeros(8)
        np.testing.assert_allclose(e[r], expected, rtol=1e-6)
    # Whatever sits on padding or answer positions does not change e ...
    scrambled = np.where(mask, ids, rng.integers(0, VOCAB, ids.shape)).astype(np.int32)
    np.testing.assert_array_equal(pool_embeddings(table, jnp.asarray(scrambled), mask), e)
    # ... unless SAPT's own behaviour (pool the padding) is asked for: answers are still never pooled.
    with_padding = np.asarray(input_mask(b, pool_padding=True))
    np.testing.assert_array_equal(with_padding, np.asarray(b["loss_mask"]) == 0)


def test_left_padding_does_not_change_the_attention():
    method = SAPT()
    state = _state_at(method, 3, 2, seed=3)
    prompt = jnp.asarray([[5, 9, 11, 7]], jnp.int32)
    table = _fake_model(3).embed
    alone = method.attention(table, state, {"input_ids": prompt, "attention_mask": jnp.ones_like(prompt)}, training=False)
    padded = jnp.concatenate([jnp.asarray([[0, 0, 0]], jnp.int32), prompt], axis=1)
    mask = jnp.asarray([[0, 0, 0, 1, 1, 1, 1]], jnp.int32)
    with_pad = method.attention(table, state, {"input_ids": padded, "attention_mask": mask}, training=False)
    np.testing.assert_array_equal(alone, with_pad)
    official = SAPT(pool_padding=True)
    shifted = official.attention(table, state, {"input_ids": padded, "attention_mask": mask}, training=False)
    assert not np.allclose(shifted, alone)  # pooling the pad embedding moves the query


@settings(max_examples=15, deadline=None)
@given(prefix=st.lists(st.integers(0, 5), max_size=6), tails=st.lists(st.lists(st.integers(6, 9), max_size=3),
                                                                     min_size=1, max_size=4))
def test_common_prefix_is_the_longest_shared_prefix(prefix, tails):
    seqs = [np.asarray(prefix + t, np.int32) for t in tails]
    found = common_prefix(seqs)
    assert all(list(s[: len(found)]) == list(found) for s in seqs)
    if all(len(s) > len(found) for s in seqs):
        assert len({int(s[len(found)]) for s in seqs}) > 1
    assert len(found) >= len(prefix)


# -- mixing -----------------------------------------------------------------------------------
@settings(max_examples=8, deadline=None)
@given(current=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_each_site_adds_the_attention_weighted_sum_of_task_loras(current, seed):
    num_tasks = 4
    method = SAPT()
    state = _state_at(method, num_tasks, current, seed)
    key = jax.random.PRNGKey(seed + 7)
    rand = lambda k, x: jax.random.normal(k, x.shape)  # noqa: E731  (pretend all LoRAs were trained)
    leaves, tree = jax.tree.flatten(state["fixed"]["past"])
    past = jax.tree.unflatten(tree, [rand(jax.random.fold_in(key, i), x) for i, x in enumerate(leaves)])
    leaves, tree = jax.tree.flatten(state["train"]["lora"])
    cur = jax.tree.unflatten(tree, [rand(jax.random.fold_in(key, 100 + i), x) for i, x in enumerate(leaves)])
    empty = (jnp.arange(num_tasks) >= current)[:, None, None]  # slots of this and later tasks are empty
    past = jax.tree.map(lambda p: jnp.where(empty, 0.0, p), past)
    state = {"train": dict(state["train"], lora=cur), "fixed": dict(state["fixed"], past=past)}

    batch = _random_batch(np.random.default_rng(seed), 3, 6)
    model = _fake_model(seed)
    ctx = method.train_ctx(model, state, batch)
    a = np.asarray(method.attention(model.embed, state, batch, training=True))
    adapter = method.adapter(state, ctx)
    x = jax.random.normal(jax.random.fold_in(key, 1), (3, 6, 16))
    for site in SHAPES:
        layer = 1
        out = adapter.hook.delta_fn(site, jax.tree.map(lambda p: p[layer], adapter.params[site]), x, ctx)
        expected = a[:, current, None, None] * lora_kernel.apply(
            jax.tree.map(lambda p: p[layer], cur[site]), x, method.alpha, method.rank)
        for i in range(current):
            lora_i = jax.tree.map(lambda p: p[layer, i], past[site])
            expected = expected + a[:, i, None, None] * lora_kernel.apply(lora_i, x, method.alpha, method.rank)
        np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)


# -- what trains, and the reflection loss -----------------------------------------------------
def _task_batches(task: int, n_rows: int = 12, batch: int = 4, length: int = 10, seed: int = 0):
    """Decoder batches of a synthetic task: a task-specific header, random words, a one-token answer."""
    rng = np.random.default_rng([seed, task])
    out = []
    for start in range(0, n_rows, batch):
        ids = rng.integers(10, VOCAB, (batch, length)).astype(np.int32)
        ids[:, :3] = [3, 4 + task, 5]
        ids[:, 7] = 6 + task  # the answer
        mask = (np.arange(length)[None] < 8).astype(np.int32).repeat(batch, 0)
        loss = (np.arange(length)[None] == 7).astype(np.float32).repeat(batch, 0)
        out.append({"input_ids": ids, "attention_mask": mask, "loss_mask": loss,
                    "task_ids": np.full(batch, task, np.int32), "real": np.ones(batch, bool)})
    return out


@pytest.fixture(scope="module")
def two_tasks():
    """Train a tiny Llama with SAPT on two synthetic tasks through the engine's jitted train step;
    keep snapshots of the state after each task."""
    model = tiny_llama(VOCAB)
    shapes = model.site_shapes()
    method = SAPT(pseudo_new_tokens=4, pseudo_min=3)
    graphdef, weights = nnx.split(model)
    trained, frozen = jstep.split_base(method, nnx.to_pure_dict(weights))
    tx = optax.adam(3e-2)
    step = jax.jit(functools.partial(jstep.train_step, graphdef=graphdef, method=method, tx=tx, max_targets=2))
    key = jax.random.PRNGKey(0)
    state = method.init(key, shapes, 3)
    snaps = {"init": state}
    for t in range(2):
        info = TaskInfo(t, 3, f"task{t}", batches=functools.partial(iter, _task_batches(t)), model=model)
        state = method.begin_task(jax.random.fold_in(key, t), state, info, shapes)
        snaps[f"begin{t}"] = state
        params = {"method": state["train"], "base": trained}
        tstate = jstep.TrainState(params, tx.init(params), jnp.int32(0))
        for s, b in enumerate(_task_batches(t) * 2):
            b = {k: v[None] for k, v in b.items() if k != "real"}
            tstate, _ = step(tstate, frozen, state["fixed"], b, jax.random.fold_in(key, 100 * t + s))
        state = method.end_task({"train": tstate.params["method"], "fixed": state["fixed"]}, info)
        snaps[f"end{t}"] = state
    return method, model, snaps


def test_past_loras_and_keys_are_bit_identical_after_the_next_task(two_tasks):
    method, _, snaps = two_tasks
    after0, after1 = snaps["end0"]["fixed"], snaps["end1"]["fixed"]
    for site in method.sites:
        for part in ("a", "b"):
            np.testing.assert_array_equal(after1["past"][site][part][:, 0], after0["past"][site][part][:, 0])
        assert np.abs(after1["past"][site]["b"][:, 1]).max() > 0  # task 1's LoRA trained and stored
        assert np.abs(after0["past"][site]["b"][:, 1]).max() == 0
    np.testing.assert_array_equal(after1["keys"][0], after0["keys"][0])
    initial_keys = snaps["init"]["fixed"]["keys"]
    assert not np.array_equal(after1["keys"][1], initial_keys[1])  # the current key trained ...
    np.testing.assert_array_equal(after1["keys"][2], initial_keys[2])  # ... a future one did not
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), snaps["end0"]["train"]["query"],
                         snaps["end1"]["train"]["query"])
    assert all(jax.tree.leaves(moved))  # the shared query network trains on every task


def _task_loss(method, model, fixed, batch):
    """``train -> answer cross-entropy`` of ``batch`` through the model with SAPT's adapter."""
    graphdef, weights = nnx.split(model)
    base = nnx.to_pure_dict(weights)

    def ce(train):
        state = {"train": train, "fixed": fixed}
        adapter = method.adapter(state, method.train_ctx(model, state, batch))
        nll, n = jstep.answer_nll(jstep.bind(graphdef, base), batch, adapter, max_targets=2)
        return nll / n

    return ce


def _loss_grads(method, model, state):
    batch = {k: jnp.asarray(v) for k, v in _task_batches(1)[0].items() if k != "real"}
    ce = _task_loss(method, model, state["fixed"], batch)

    def reflection(train):
        return method.extra_loss({"train": train, "fixed": state["fixed"]}, None)

    grads = jax.jit(lambda train: (jax.grad(ce)(train), jax.grad(reflection)(train), reflection(train)))
    return grads(state["train"])


def _norm(tree):
    return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_reflection_loss_reaches_the_query_network_and_keys_only(two_tasks):
    method, model, snaps = two_tasks
    state = snaps["begin1"]
    ce_grads, kl_grads, kl = _loss_grads(method, model, state)
    assert float(kl) > 0
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(kl_grads["lora"]))
    assert _norm(kl_grads["query"]) > 0 and _norm(kl_grads["key"]) > 0
    # The task loss trains the current key, the query network (through the past LoRA's weight)
    # and the current LoRA; nothing else is in the train state.
    assert set(ce_grads) == {"lora", "query", "key"}
    assert _norm(ce_grads["query"]) > 0 and _norm(ce_grads["key"]) > 0 and _norm(ce_grads["lora"]) > 0
    # No past task at the first task: no reflection.
    assert float(method.extra_loss(snaps["begin0"], None)) == 0.0
    doubled = dataclasses.replace(method, kl_ratio=2 * method.kl_ratio)
    np.testing.assert_allclose(doubled.extra_loss(state, None), 2 * kl, rtol=1e-6)


def test_stored_mean_attention_and_pseudo_inputs(two_tasks):
    method, model, snaps = two_tasks
    fixed = snaps["end1"]["fixed"]
    targets = np.asarray(fixed["targets"])
    np.testing.assert_allclose(targets[0], [1, 0, 0], atol=1e-6)  # one task seen: all attention on it
    np.testing.assert_allclose(targets[1].sum(), 1, rtol=1e-5)
    assert targets[1, 2] == 0 and (targets[2] == 0).all()
    state = snaps["end1"]
    rows = _task_batches(1)
    batch = {k: jnp.concatenate([jnp.asarray(b[k]) for b in rows])
             for k in ("input_ids", "attention_mask", "loss_mask")}
    mean = np.asarray(method.attention(model.embed[...], state, batch, training=False)).mean(axis=0)
    np.testing.assert_allclose(mean, targets[1], rtol=1e-4, atol=1e-6)
    # 12 examples: 2% rounds to 0, so pseudo_min (3) pseudo-inputs; they continue the shared header,
    # so their pooled embedding dominates the header's.
    valid = np.asarray(fixed["pseudo_valid"])
    np.testing.assert_array_equal(valid.sum(axis=1), [3, 3, 0])
    header = pool_embeddings(model.embed[...], jnp.asarray([[3, 4 + 1, 5]]), jnp.ones((1, 3)))
    assert (np.asarray(fixed["pseudo"][1, :3]) >= np.asarray(header) - 1e-6).all()
    assert method.report(state)["pseudo_inputs_per_task"] == [3, 3, 0]


def test_mean_attention_is_taken_on_the_validation_inputs_when_there_are_some():
    model = tiny_llama(VOCAB)
    method = SAPT(pseudo_source="real", pseudo_min=2)
    shapes = model.site_shapes()
    state = method.init(jax.random.PRNGKey(0), shapes, 3)
    for t in range(2):
        held_out = _task_batches(t, seed=50 + t, n_rows=4)
        info = TaskInfo(t, 3, f"t{t}", batches=functools.partial(iter, _task_batches(t)), model=model,
                        validation_batches=functools.partial(iter, held_out))
        state = method.begin_task(jax.random.PRNGKey(1 + t), state, info, shapes)
        # move the query network and the key so that attention differs between inputs
        state = dict(state, train=jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(7 + t), x.shape),
                                               state["train"]))
        state = method.end_task(state, info)
    table = model.embed[...]

    def mean_over(rows):
        batch = {k: jnp.concatenate([jnp.asarray(b[k]) for b in rows]) for k in ("input_ids", "attention_mask", "loss_mask")}
        return np.asarray(method.attention(table, state, batch, training=False)).mean(axis=0)

    target = np.asarray(state["fixed"]["targets"][1])
    np.testing.assert_allclose(target, mean_over(_task_batches(1, seed=51, n_rows=4)), rtol=1e-4, atol=1e-6)
    assert not np.allclose(target, mean_over(_task_batches(1)), rtol=1e-4, atol=1e-6)


def test_real_pseudo_inputs_are_pooled_prompts_of_the_task():
    model = tiny_llama(VOCAB)
    method = SAPT(pseudo_source="real", pseudo_min=2)
    shapes = model.site_shapes()
    info = TaskInfo(0, 2, "t0", batches=functools.partial(iter, _task_batches(0)), model=model)
    state = method.begin_task(jax.random.PRNGKey(1), method.init(jax.random.PRNGKey(0), shapes, 2), info, shapes)
    state = method.end_task(state, info)
    prompts = [row[:7] for b in _task_batches(0) for row in b["input_ids"]]
    pooled = np.asarray(pool_embeddings(model.embed[...], jnp.asarray(np.stack(prompts)), jnp.ones((12, 7))))
    stored = np.asarray(state["fixed"]["pseudo"][0, :2])
    for row in stored:
        assert np.min(np.abs(pooled - row).max(axis=1)) < 1e-6


def test_t5_encoder_and_decoder_sites_train_and_pseudo_inputs_are_generated():
    model = tiny_t5(VOCAB)
    shapes = model.site_shapes()
    method = SAPT(sites=T5_SITES, pseudo_new_tokens=3, pseudo_min=2)

    def batches(task):
        rng = np.random.default_rng(task)
        ids = rng.integers(10, VOCAB, (4, 8)).astype(np.int32)
        ids[:, :2] = [3, 4 + task]
        return [{"input_ids": ids, "attention_mask": np.ones((4, 8), np.int32),
                 "decoder_input_ids": np.zeros((4, 2), np.int32), "labels": np.full((4, 2), 6, np.int32),
                 "decoder_mask": np.ones((4, 2), np.int32), "loss_mask": np.ones((4, 2), np.float32),
                 "task_ids": np.full(4, task, np.int32), "real": np.ones(4, bool)}]

    def pretend_trained(state):  # a non-zero current LoRA at every site
        lora = jax.tree.map(lambda x: x + 0.3, state["train"]["lora"])
        return {"train": dict(state["train"], lora=lora), "fixed": state["fixed"]}

    infos = [TaskInfo(t, 2, f"t{t}", batches=functools.partial(iter, batches(t)), model=model) for t in range(2)]
    state = method.begin_task(jax.random.PRNGKey(1), method.init(jax.random.PRNGKey(0), shapes, 2), infos[0], shapes)
    state = method.end_task(pretend_trained(state), infos[0])
    state = pretend_trained(method.begin_task(jax.random.PRNGKey(2), state, infos[1], shapes))
    np.testing.assert_array_equal(np.asarray(state["fixed"]["pseudo_valid"]).sum(axis=1), [2, 0])
    batch = {k: jnp.asarray(v) for k, v in batches(1)[0].items() if k != "real"}
    ce = _task_loss(method, model, state["fixed"], batch)
    grads = jax.jit(jax.grad(ce))(state["train"])
    assert _norm(grads["query"]) > 0
    for site in T5_SITES:  # encoder and decoder sites all see the adapter
        assert _norm(grads["lora"][site]) > 0


# -- the whole engine ---------------------------------------------------------------------------
@pytest.mark.slow
def test_full_run_writes_per_task_mean_attention(stream_root, tiny_tokenizer, tmp_path):
    cfg = jconfig.from_dict(tiny_config(stream_root, method="sapt", method_args={"pseudo_new_tokens": 4},
                                           train={"steps_per_task": 3, "batch_size": 4, "lr": 1e-2}))
    model = (tiny_llama(len(tiny_tokenizer)), tiny_tokenizer)
    run(cfg, str(tmp_path), model_and_tokenizer=model, progress=False)
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    attention = np.array(results["method_report"]["mean_attention"])
    assert attention.shape == (3, 3)
    np.testing.assert_allclose(attention.sum(axis=1), 1.0, atol=1e-5)
    assert (np.triu(attention, 1) == 0).all()
    assert results["method_report"]["pseudo_source"] == "generated"
    routing = np.array(results["routing_accuracy"])
    assert routing.shape == (3, 3) and ((0 <= routing) & (routing <= 100)).all()
    assert routing[0].tolist() == [100, 0, 0]  # one task trained: every prompt goes to it


def test_bad_options_give_one_clear_error():
    with pytest.raises(ValueError, match="pseudo_source"):
        build("sapt", {"pseudo_source": "memory"})
    with pytest.raises(ValueError, match="new_lora_per_task"):
        build("sapt", {"new_lora_per_task": False})
    with pytest.raises(ValueError, match="TaskInfo.model"):
        SAPT().begin_task(jax.random.PRNGKey(0), SAPT().init(jax.random.PRNGKey(0), SHAPES, 2), TaskInfo(0, 2), SHAPES)
