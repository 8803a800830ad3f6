"""The contract every registered method (and the wrappers around them) keeps with the engine, on a
tiny random Llama (and a tiny T5 for some): declared logical axes on every state leaf, a state whose
structure, shapes and dtypes never change across tasks, hooks that run under ``jit`` (through the
engine's own train step), frozen base weights that stay bit-identical, and an Orbax round trip."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcl import methods
from jaxcl.methods import MethodState, ModelInfo, StepContext
from jaxcl.methods import axes
from jaxcl.methods.sapt import T5_SITES
from jaxcl.train.checkpoint import Checkpointer

from tiny_cl import METHOD_ARGS as ARGS, WRAPPER_ARGS as WRAPPED, EngineSteps, task_info, tiny_llama, tiny_stream, tiny_t5

NAMES = sorted(ARGS) + sorted(WRAPPED)
VOCABULARY = {"layers", "tasks", "rank", "experts", "embed", "q_heads", "kv_heads", "mlp", "vocab", "expansion", "mask",
              "bottleneck", None}


def test_every_registered_method_is_covered():
    assert set(ARGS) == set(methods.REGISTRY)


def _signature(tree):
    return jax.tree.structure(tree), [(np.shape(x), jnp.asarray(x).dtype) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def llama(tiny_tokenizer):
    return tiny_llama(len(tiny_tokenizer))


@pytest.fixture(scope="module")
def stream(stream_root, tiny_tokenizer):
    return tiny_stream(stream_root, tiny_tokenizer)


class Cycled:
    """A method's boxed initial state and its states over three begin_task/end_task cycles."""

    def __init__(self, name, args, model, stream):
        self.method = methods.build(name, dict(args))
        self.model, self.stream = model, stream
        self.boxed = self.method.init(jax.random.PRNGKey(0), ModelInfo.of(model), 3)
        state, self.axes = axes.split(self.boxed)
        self.states = {"init": state}
        for t in range(3):
            info = task_info(stream, t, model, total_steps=4 * t)
            state = self.method.begin_task(jax.random.PRNGKey(1 + t), state, info)
            self.states[f"begin{t}"] = state
            state = self.method.end_task(state, info)
            self.states[f"end{t}"] = state


_CACHE = {}


def _cycled(name, model, stream):
    if name not in _CACHE:
        _CACHE.clear()  # one method at a time: the parametrised tests below run method by method
        _CACHE[name] = Cycled(name, {**ARGS, **WRAPPED}[name], model, stream)
    return _CACHE[name]


@pytest.mark.parametrize("name", NAMES)
class TestContract:
    def test_every_state_leaf_has_declared_logical_axes(self, name, llama, stream):
        c = _cycled(name, llama, stream)
        values = c.states["init"]
        names = jax.tree.leaves(c.axes, is_leaf=lambda x: isinstance(x, axes.Axes))
        leaves = jax.tree.leaves(values)
        assert len(names) == len(leaves)
        site_axes = {a for pair in ModelInfo.of(llama).site_axes.values() for a in pair}
        for declared, leaf in zip(names, leaves):
            assert isinstance(declared, axes.Axes) and len(declared.names) == np.ndim(leaf)
            assert set(declared.names) <= VOCABULARY | site_axes, declared

    def test_state_structure_shapes_and_dtypes_never_change(self, name, llama, stream):
        c = _cycled(name, llama, stream)
        expected = _signature(c.states["init"])
        for moment, state in c.states.items():
            assert isinstance(state, MethodState), moment
            assert _signature(state) == expected, moment

    def test_orbax_round_trip_gives_identical_leaves(self, name, llama, stream, tmp_path):
        c = _cycled(name, llama, stream)
        state = c.states["end1"]
        items = {k: v for k, v in (("params", state.params), ("fixed", state.fixed)) if jax.tree.leaves(v)}
        ckpt = Checkpointer(str(tmp_path))
        ckpt.save(1, items, {"moment": "end1"})
        template = c.states["init"]
        for item, tree in items.items():
            restored = ckpt.restore(1, item, getattr(template, item))
            assert jax.tree.structure(restored) == jax.tree.structure(tree)
            for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        ckpt.close()

    def test_hooks_run_under_jit(self, name, llama, stream):
        c = _cycled(name, llama, stream)
        method = c.method
        state = c.states["begin1"]
        step = StepContext.start(1, 2, 4)
        past = [0] if method.replay is not None else []
        train = {k: jnp.asarray(v[0]) for k, v in stream.train_feed(1, [1], past, method.replay)(0).items()}
        _, _, evaluation = stream.eval_queue()[0]
        evaluation = {k: jnp.asarray(v) for k, v in evaluation.items()}

        @nnx.jit
        def forward(model, state, train, evaluation, key):
            # one program for both sides, so each method compiles the tiny model once
            adapter = method.adapter(state, method.train_ctx(model, state, train, step), key)
            trained = model.hidden(train["input_ids"], train["attention_mask"], adapter=adapter)
            loss = method.extra_loss(model, state, train, step)
            adapter = method.adapter(state, method.eval_ctx(model, state, evaluation))
            evaluated = model.hidden(evaluation["input_ids"], evaluation["attention_mask"], adapter=adapter)
            picked = method.route(model, state, evaluation) if method.routes else jnp.zeros((), jnp.int32)
            return trained, loss, evaluated, picked

        trained, loss, evaluated, picked = forward(llama, state, train, evaluation, jax.random.PRNGKey(3))
        assert np.all(np.isfinite(np.asarray(trained))) and np.all(np.isfinite(np.asarray(evaluated)))
        assert loss.shape == () and np.isfinite(float(loss))
        if method.routes:
            assert picked.shape == (evaluation["input_ids"].shape[0],) and picked.dtype == jnp.int32
            assert set(np.asarray(picked).tolist()) <= {0}  # while task 1 trains only task 0 is seen

        @jax.jit
        def update(state, key):
            grads = {"method": jax.tree.map(jnp.ones_like, state.params), "base": {}}
            grads = method.transform_grads(grads, state, key, step)
            new = method.post_update(state, step)
            return grads, new, method.step_metrics(state, new)

        grads, new, metrics = update(state, jax.random.PRNGKey(4))
        assert _signature(grads["method"]) == _signature(state.params)
        assert _signature(new) == _signature(state)
        assert all(np.shape(v) == () for v in metrics.values())
        assert isinstance(method.report(c.states["end2"]), dict)


# The engine's train step compiles the whole model's backward pass (the slow part of these tests):
# run it for the three ways a method treats the base weights — trains some (seq_ft), freezes them
# (seq_lora), tunes them through a delta of its own (mist).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["seq_ft", "seq_lora", "mist+seq_lora"])
def test_engine_steps_train_the_base_exactly_where_the_method_says(name, llama, stream):
    c = _cycled(name, llama, stream)
    method = c.method
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(llama)))
    state = c.states["begin1"]
    feed = stream.train_feed(1, [1], [], None)
    trainer = EngineSteps(method, llama, optax.adam(1e-2), stream.spec.max_answer_len)
    after, base, metrics = trainer.run(state, [feed(0), feed(1)], StepContext.start(1, 2, 4))
    assert _signature(after) == _signature(state)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(state.params))) \
        or not jax.tree.leaves(state.params)
    trained = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(base)}
    for path, value in jax.tree_util.tree_leaves_with_path(before):
        key = jax.tree_util.keystr(path)
        assert (key in trained) == method.base_trainable("/".join(str(k.key) for k in path)), key
        if key in trained:
            assert np.any(np.asarray(trained[key]) != value), key
    assert (name == "seq_ft") == bool(trained) == ("base_changed" in metrics[0])
    # the frozen weights are the caller's model's, never written (the train step does not donate them)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(llama))))


T5_ARGS = {"seq_lora": {}, "oa_adapter": {}, "sapt": {"sites": list(T5_SITES), "pseudo_new_tokens": 2}}


@pytest.mark.parametrize("name", sorted(T5_ARGS))
def test_on_t5_the_state_is_stable_and_the_hooks_run_under_jit(name, stream_root, tiny_tokenizer):
    model = tiny_t5(len(tiny_tokenizer))
    stream = tiny_stream(stream_root, tiny_tokenizer, encoder_decoder=True)
    c = Cycled(name, T5_ARGS[name], model, stream)
    expected = _signature(c.states["init"])
    for moment, state in c.states.items():
        assert _signature(state) == expected, moment
    method, state, step = c.method, c.states["begin1"], StepContext.start(1, 2, 4)
    train = {k: jnp.asarray(v[0]) for k, v in stream.train_feed(1, [1], [], None)(0).items()}
    _, _, evaluation = stream.eval_queue()[0]
    evaluation = {k: jnp.asarray(v) for k, v in evaluation.items()}

    @nnx.jit
    def forward(model, state, train, evaluation, key):
        adapter = method.adapter(state, method.train_ctx(model, state, train, step), key)
        logits = model(train["input_ids"], train["attention_mask"], train["decoder_input_ids"], train["decoder_mask"],
                       adapter=adapter)
        adapter = method.adapter(state, method.eval_ctx(model, state, evaluation))
        encoded = model.encode(evaluation["input_ids"], evaluation["attention_mask"], adapter=adapter)
        return logits, method.extra_loss(model, state, train, step), encoded

    logits, loss, encoded = forward(model, state, train, evaluation, jax.random.PRNGKey(3))
    assert np.all(np.isfinite(np.asarray(logits))) and np.all(np.isfinite(np.asarray(encoded)))
    assert np.isfinite(float(loss))
