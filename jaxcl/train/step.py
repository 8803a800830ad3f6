"""The jitted train and evaluation steps, pure functions over explicit pytrees.

The model is held as ``(graphdef, base)`` with ``base`` a plain dict of arrays
(``nnx.to_pure_dict``). What trains is split out of everything that does not:

  ``TrainState.params = {"method": state["train"], "base": <trained base leaves, None elsewhere>}``

so frozen weights are never differentiated, never get optimizer state and are never written
(they are a separate, non-donated argument). Methods that train several parameter groups
differently label them through ``optax.partition`` (see ``optim.py``).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxcl.methods.base import Method


class TrainState(NamedTuple):
    params: dict       # {"method": ..., "base": ...}; frozen base leaves are None
    opt_state: Any
    step: jax.Array    # optimizer steps taken in the current task


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def split_base(method: Method, base: dict) -> tuple[dict, dict]:
    """(trained, frozen) copies of ``base`` with ``None`` where a leaf belongs to the other side."""
    flags = jax.tree_util.tree_map_with_path(lambda p, _: method.base_trainable(path_str(p)), base)
    trained = jax.tree.map(lambda x, f: x if f else None, base, flags)
    frozen = jax.tree.map(lambda x, f: None if f else x, base, flags)
    return trained, frozen


def merge_base(trained: dict, frozen: dict) -> dict:
    return jax.tree.map(lambda t, f: f if t is None else t, trained, frozen, is_leaf=lambda x: x is None)


def bind(graphdef: nnx.GraphDef, base: dict) -> nnx.Module:
    """The NNX model with the given parameters (cheap: done once per trace)."""
    return nnx.merge(graphdef, base)


def answer_nll(model: nnx.Module, batch: dict, adapter: Any, max_targets: int) -> tuple[jax.Array, jax.Array]:
    """Summed negative log-likelihood of the answer tokens and their count.

    Decoder-only batches: ``input_ids, attention_mask, loss_mask`` (B, S), ``loss_mask`` marking the
    answer tokens (and EOS). The LM head is applied only at the ``max_targets`` positions per example
    that predict an answer token, not over the whole sequence (the vocabulary projection dominates
    the cost of a short-answer step otherwise).
    Encoder-decoder batches: ``input_ids, attention_mask, decoder_input_ids, decoder_mask, labels``.
    """
    if model.is_encoder_decoder:
        logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                       batch["decoder_mask"], adapter=adapter)
        targets, weights = batch["labels"], batch["loss_mask"]
    else:
        hidden = model.hidden(batch["input_ids"], batch["attention_mask"], adapter=adapter)
        predicts = batch["loss_mask"][:, 1:]               # hidden[t] predicts token t + 1
        where = jax.vmap(lambda m: jnp.nonzero(m, size=max_targets, fill_value=0)[0])(predicts)
        weights = jnp.take_along_axis(predicts, where, axis=1)
        targets = jnp.take_along_axis(batch["input_ids"][:, 1:], where, axis=1)
        logits = model.logits(jnp.take_along_axis(hidden[:, :-1], where[..., None], axis=1))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)


def _loss(params, frozen_base, fixed, batch, key, *, graphdef, method, max_targets):
    base = merge_base(params["base"], frozen_base)
    model = bind(graphdef, base)
    state = {"train": params["method"], "fixed": fixed}
    adapter = method.adapter(state, method.train_ctx(model, state, batch), key)
    nll, count = answer_nll(model, batch, adapter, max_targets)
    ce = nll / jnp.maximum(count, 1.0)
    return ce + method.extra_loss(state, base), ce


def train_step(tstate: TrainState, frozen_base: dict, fixed: dict, batch: dict, key: jax.Array, *,
               graphdef, method: Method, tx: optax.GradientTransformation, max_targets: int):
    """One optimizer step over ``batch`` whose arrays have a leading (grad_accum,) axis.

    Returns the new state and ``{"loss", "ce"}`` averaged over the micro-batches; when base weights
    train, also ``"base_changed"``: the share of their entries this step changed (MIST's sparsity).
    """
    grad_fn = jax.value_and_grad(functools.partial(_loss, graphdef=graphdef, method=method,
                                                   max_targets=max_targets), has_aux=True)
    num_micro = jax.tree.leaves(batch)[0].shape[0]

    def micro(acc, inputs):
        mb, i = inputs
        (loss, ce), g = grad_fn(tstate.params, frozen_base, fixed, mb, jax.random.fold_in(key, i))
        acc = jax.tree.map(jnp.add, acc, (g, loss, ce))
        return acc, None

    zeros = (jax.tree.map(jnp.zeros_like, tstate.params), jnp.zeros(()), jnp.zeros(()))
    (grads, loss, ce), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(num_micro)))
    grads = jax.tree.map(lambda g: g / num_micro, grads)
    state = {"train": tstate.params["method"], "fixed": fixed}
    grads = method.transform_grads(grads, state, jax.random.fold_in(key, num_micro))
    updates, opt_state = tx.update(grads, tstate.opt_state, tstate.params)
    params = optax.apply_updates(tstate.params, updates)
    state = method.post_update({"train": params["method"], "fixed": fixed})
    params = dict(params, method=state["train"])
    metrics = {"loss": loss / num_micro, "ce": ce / num_micro}
    old_base, new_base = jax.tree.leaves(tstate.params["base"]), jax.tree.leaves(params["base"])
    if old_base:
        # float32 counts: an int32 sum overflows past 2**31 entries (full fine-tuning of a 7B model)
        changed = sum(jnp.sum(a != b, dtype=jnp.float32) for a, b in zip(old_base, new_base))
        metrics["base_changed"] = changed / sum(a.size for a in old_base)
    return TrainState(params, opt_state, tstate.step + 1), metrics


def generate_step(params, frozen_base, fixed, input_ids, attention_mask, task, *, graphdef, method: Method,
                  max_new_tokens: int, eos_token_id: int):
    """Greedy continuation ids (B, max_new_tokens) of a left-padded (decoder-only) batch."""
    model = bind(graphdef, merge_base(params["base"], frozen_base))
    state = {"train": params["method"], "fixed": fixed}
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    adapter = method.adapter(state, method.eval_ctx(model, state, batch, task), None)
    return model.generate_ids(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                              eos_token_id=eos_token_id, adapter=adapter)


def route_step(params, frozen_base, fixed, input_ids, attention_mask, *, graphdef, method: Method):
    """The task (B,) a routing method picks for each prompt of a left-padded batch."""
    model = bind(graphdef, merge_base(params["base"], frozen_base))
    state = {"train": params["method"], "fixed": fixed}
    return method.route(model, state, {"input_ids": input_ids, "attention_mask": attention_mask})
