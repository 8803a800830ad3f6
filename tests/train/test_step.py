"""The jitted train step: frozen weights stay bit-identical, accumulation equals a big batch."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxcl import methods
from jaxcl.data import collate_train, load_stream, make_batch_spec, tokenize_examples
from jaxcl.methods import TaskInfo
from jaxcl.train import step as jstep

from tiny_cl import TASKS


def _setup(tiny_model, stream_root, method, batch_size=8):
    model, tok = tiny_model
    task = load_stream("cl_benchmark", list(TASKS), stream_root)[0]
    spec = make_batch_spec(tok, "decoder", 48, 4, bucket_multiple=16)
    rows = tokenize_examples(task.train[:batch_size], tok, spec)
    batch = collate_train(rows, np.ones(len(rows), bool), spec)
    batch.pop("position_ids")
    batch["task_ids"] = np.zeros(len(rows), np.int32)
    graphdef, state = nnx.split(model)
    base = nnx.to_pure_dict(state)
    trained, frozen = jstep.split_base(method, base)
    mstate = method.init(jax.random.PRNGKey(0), model.site_shapes(), 1)
    mstate = method.begin_task(jax.random.PRNGKey(1), mstate, TaskInfo(0, 1), model.site_shapes())
    return graphdef, base, trained, frozen, mstate, batch, spec


def _steps(graphdef, trained, frozen, mstate, batch, method, tx, n, accum=1, spec=None):
    # the step donates its state: train on copies so a test can run twice from the same start
    params = jax.tree.map(jnp.copy, {"method": mstate["train"], "base": trained})
    ts = jstep.TrainState(params, tx.init(params), jnp.int32(0))
    fn = jax.jit(functools.partial(jstep.train_step, graphdef=graphdef, method=method, tx=tx,
                                   max_targets=spec.max_answer_len), donate_argnums=(0,))
    micro = {k: v.reshape((accum, -1) + v.shape[1:]) for k, v in batch.items()}
    losses = []
    for i in range(n):
        ts, m = fn(ts, frozen, mstate["fixed"], micro, jax.random.PRNGKey(i))
        losses.append(float(m["loss"]))
    return ts, losses


def test_lora_training_leaves_base_weights_bit_identical(tiny_model, stream_root):
    method = methods.build("olora", {"dropout": 0.0})[0]
    graphdef, base, trained, frozen, mstate, batch, spec = _setup(tiny_model, stream_root, method)
    before = jax.tree.map(np.array, base)
    tx = optax.adamw(1e-2)
    ts, losses = _steps(graphdef, trained, frozen, mstate, batch, method, tx, 5, spec=spec)
    assert all(x is None for x in jax.tree.leaves(ts.params["base"], is_leaf=lambda x: x is None))
    # the optimizer holds state for the LoRA leaves only
    n_lora = sum(x.size for x in jax.tree.leaves(ts.params["method"]))
    n_opt = sum(x.size for x in jax.tree.leaves(ts.opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_lora
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b), err_msg=str(path))
    assert losses[-1] < losses[0]
    b_after = ts.params["method"]["lora"]["attn.q"]["b"]
    assert float(jnp.abs(b_after).max()) > 0  # the adapter did train


def test_seq_ft_trains_base_weights(tiny_model, stream_root):
    method = methods.build("seq_ft", {"frozen": ["embed"]})[0]
    graphdef, base, trained, frozen, mstate, batch, spec = _setup(tiny_model, stream_root, method)
    tx = optax.sgd(1e-1)
    ts, losses = _steps(graphdef, trained, frozen, mstate, batch, method, tx, 3, spec=spec)
    changed = [not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(ts.params["base"]))]
    assert any(changed) and losses[-1] < losses[0]
    assert all("embed" not in jstep.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(trained)[0])


def test_gradient_accumulation_equals_one_big_batch(tiny_model, stream_root):
    method = methods.build("seq_lora", {"dropout": 0.0})[0]
    graphdef, base, trained, frozen, mstate, batch, spec = _setup(tiny_model, stream_root, method)
    # every example has the same number of answer tokens (one word + EOS), so the mean of the
    # micro-batch means equals the big batch's mean
    tx = optax.sgd(0.5)
    one, _ = _steps(graphdef, trained, frozen, mstate, batch, method, tx, 2, accum=1, spec=spec)
    two, _ = _steps(graphdef, trained, frozen, mstate, batch, method, tx, 2, accum=2, spec=spec)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
