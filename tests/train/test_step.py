"""The jitted train step and the answer loss: frozen weights stay bit-identical, accumulation equals a
big batch exactly, padding never counts as an answer token, generation stops at any EOS id."""
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxcl import methods
from jaxcl.data import collate_train, load_stream, make_batch_spec, tokenize_examples
from jaxcl.methods import axes as jaxes
from jaxcl.methods.base import ModelInfo, StepContext, TaskInfo
from jaxcl.methods.seq_ft import BaseModel
from jaxcl.train import step as jstep

from tiny_cl import TASKS


def _task_batch(tiny_model, stream_root, rows=8):
    _, tok = tiny_model
    task = load_stream("cl_benchmark", list(TASKS), stream_root)[0]
    spec = make_batch_spec(tok, "decoder", 48, 4, bucket_multiple=16)
    tokenized = tokenize_examples(task.train[:rows], tok, spec)
    batch = collate_train(tokenized, np.ones(len(tokenized), bool), spec)
    batch.pop("position_ids")
    return dict(batch, task_ids=np.zeros(len(tokenized), np.int32)), spec.max_answer_len


def _setup(model, method):
    graphdef, weights = nnx.split(model)
    trained, frozen = jstep.split_base(method, nnx.to_pure_dict(weights))
    state, _ = jaxes.split(method.init(jax.random.PRNGKey(0), ModelInfo.of(model), 1))
    state = method.begin_task(jax.random.PRNGKey(1), state, TaskInfo(0, 1))
    return graphdef, trained, frozen, state


def _steps(model, method, batch, make_tx, n, max_targets, accum=1):
    """``n`` steps from the method's initial state with ``accum`` micro-batches; (state, losses)."""
    graphdef, trained, frozen, state = _setup(model, method)
    # the step donates its state: train on copies so a test can run twice from the same start
    params = jax.tree.map(jnp.copy, {"method": state.params, "base": trained})
    ts = jstep.TrainState(params, make_tx(n).init(params), StepContext.start(0, n, 0))
    fn = jax.jit(functools.partial(jstep.train_step, graphdef=graphdef, method=method, make_tx=make_tx,
                                   max_targets=max_targets), donate_argnums=(0,))
    micro = {k: v.reshape((accum, -1) + v.shape[1:]) for k, v in batch.items()}
    losses = []
    for i in range(n):
        ts, m = fn(ts, frozen, state.fixed, micro, jax.random.PRNGKey(i))
        losses.append(float(m["loss"]))
    return ts, losses, frozen


def test_lora_training_leaves_base_weights_bit_identical(tiny_model, stream_root):
    model = tiny_model[0]
    method = methods.build("olora", {"dropout": 0.0})
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))
    batch, max_targets = _task_batch(tiny_model, stream_root)
    ts, losses, frozen = _steps(model, method, batch, lambda n: optax.adamw(1e-2), 5, max_targets)
    assert all(x is None for x in jax.tree.leaves(ts.params["base"], is_leaf=lambda x: x is None))
    # the optimizer holds state (mu and nu) for the LoRA leaves only
    n_lora = sum(x.size for x in jax.tree.leaves(ts.params["method"]))
    n_opt = sum(x.size for x in jax.tree.leaves(ts.opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_lora
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b), err_msg=str(path))
    assert losses[-1] < losses[0]
    assert float(jnp.abs(ts.params["method"].lora["attn.q"].b).max()) > 0  # the adapter did train
    assert int(ts.ctx.step) == 5 and int(ts.ctx.total_step) == 5


def test_seq_ft_trains_base_weights_but_not_the_frozen_ones(tiny_model, stream_root):
    model = tiny_model[0]
    method = methods.build("seq_ft", {"frozen": ["embed"]})
    trained = jstep.split_base(method, nnx.to_pure_dict(nnx.state(model)))[0]
    batch, max_targets = _task_batch(tiny_model, stream_root)
    ts, losses, _ = _steps(model, method, batch, lambda n: optax.sgd(1e-1), 3, max_targets)
    changed = [not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(ts.params["base"]))]
    assert any(changed) and losses[-1] < losses[0]
    assert ts.params["base"]["embed"] is None and trained["embed"] is None


def _uneven_batch(vocab: int, rows: int = 8, length: int = 16) -> dict:
    """A right-padded decoder batch whose first half of rows has 1 answer token and second half 6."""
    rng = np.random.default_rng(0)
    ids = rng.integers(4, vocab, (rows, length)).astype(np.int32)
    real = np.arange(length)[None] < np.array([10, 12, 11, 9, 16, 14, 15, 13])[:, None]
    ids = np.where(real, ids, 0)
    answer_len = np.where(np.arange(rows) < rows // 2, 1, 6)
    ends = real.sum(1)
    loss = (np.arange(length)[None] >= (ends - answer_len)[:, None]) & real
    return {"input_ids": ids, "attention_mask": real.astype(np.int32), "loss_mask": loss.astype(np.float32),
            "task_ids": np.zeros(rows, np.int32)}


def test_gradient_accumulation_equals_one_big_batch_with_uneven_answer_tokens(tiny_model):
    model = tiny_model[0]
    method = methods.build("seq_lora", {"dropout": 0.0})
    batch = _uneven_batch(model.config.vocab_size)
    graphdef = nnx.split(model)[0]
    make_tx = lambda n: optax.sgd(1.0)  # noqa: E731  (the update is the gradient itself)
    _, trained, frozen, state = _setup(model, method)
    start = {"method": state.params, "base": trained}
    one, loss1, _ = _steps(model, method, batch, make_tx, 1, 8, accum=1)
    for accum in (2, 4):
        many, loss_n, _ = _steps(model, method, batch, make_tx, 1, 8, accum=accum)
        np.testing.assert_allclose(loss_n, loss1, rtol=1e-6)
        for a, b, a0 in zip(jax.tree.leaves(one.params), jax.tree.leaves(many.params), jax.tree.leaves(start)):
            # compare the updates (the gradients), not the parameters they are added to
            da, db = np.asarray(a) - np.asarray(a0), np.asarray(b) - np.asarray(a0)
            np.testing.assert_allclose(db, da, rtol=1e-5, atol=1e-6 * np.abs(da).max())

    # the test can tell: a mean of the two micro-batches' means is a different loss
    bound = jstep.bind(graphdef, jstep.merge_base(trained, frozen))
    adapter = method.adapter(state, None, None)
    halves = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 4), slice(4, 8))]
    means = [float(nll / n) for nll, n in (jstep.answer_nll(bound, h, adapter, 8) for h in halves)]
    assert abs(np.mean(means) - loss1[0]) > 1e-3


def _full_nll(model, batch, adapter):
    """The reference: logits at every position, each answer token predicted by the one before."""
    logits = model.logits(model.hidden(batch["input_ids"], batch["attention_mask"], adapter=adapter))
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], -1)[..., 0]
    weights = batch["loss_mask"][:, 1:]
    return float(jnp.sum(nll * weights)), float(jnp.sum(weights))


def test_answer_nll_counts_every_answer_token_once_and_padding_never(tiny_model):
    model = tiny_model[0]
    batch = _uneven_batch(model.config.vocab_size)
    # a row whose answer starts at position 1: position 0 predicts a real token, and the unused
    # target slots also point at position 0; only the real one may count
    batch["loss_mask"][0] = 0.0
    batch["loss_mask"][0, 1] = 1.0
    nll, count = jstep.answer_nll(model, batch, None, 8)
    want_nll, want_count = _full_nll(model, batch, None)
    assert float(count) == want_count == float(batch["loss_mask"][:, 1:].sum())
    np.testing.assert_allclose(float(nll), want_nll, rtol=1e-6)
    assert float(jstep.answer_tokens(batch, False, 8)) == want_count
    # what sits in the padding changes nothing
    noisy = dict(batch, input_ids=np.where(batch["attention_mask"] > 0, batch["input_ids"], 7))
    np.testing.assert_allclose(float(jstep.answer_nll(model, noisy, None, 8)[0]), float(nll), rtol=1e-6)


def test_generation_stops_at_any_of_several_eos_ids(tiny_model):
    from jaxcl.train.evaluate import Evaluator
    from jaxcl.train.loop import _eos_ids

    model = tiny_model[0]
    graphdef, weights = nnx.split(model)
    base = nnx.to_pure_dict(weights)
    rng = np.random.default_rng(3)
    ids = rng.integers(4, model.config.vocab_size, (3, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    batch = {"input_ids": ids, "attention_mask": mask, "task_ids": np.zeros(3, np.int32)}
    state = BaseModel().init(None, None, 0)
    params = {"method": state.params, "base": jax.tree.map(lambda _: None, base)}

    def generate(eos):
        fn = functools.partial(jstep.generate_step, graphdef=graphdef, method=BaseModel(), max_new_tokens=8,
                               eos_token_id=eos)
        return np.asarray(jax.jit(fn)(params, base, state.fixed, batch))

    free = generate((model.config.vocab_size + 5,))  # an id the model never emits
    eos = (int(free[0, 2]), int(free[1, 4]), int(free[2, 6]))
    stopped = generate(eos)
    expected = np.full_like(free, eos[0])
    for b, row in enumerate(free):
        end = np.flatnonzero(np.isin(row, eos))[0] + 1
        expected[b, :end] = row[:end]
    assert (expected != free).any()
    np.testing.assert_array_equal(stopped, expected)
    # the evaluator cuts each row before the first of the ids, whichever it is
    evaluator = Evaluator.__new__(Evaluator)
    evaluator.eos_ids = eos
    cut = evaluator._until_eos(stopped[1])
    assert cut == list(stopped[1, :np.flatnonzero(np.isin(stopped[1], eos))[0]])
    # the run stops at the tokenizer's EOS and every one the model config declares (Llama 3)
    llama3 = SimpleNamespace(config=SimpleNamespace(eos_token_id=[128001, 128009]))
    assert _eos_ids(128009, llama3) == (128001, 128009)
