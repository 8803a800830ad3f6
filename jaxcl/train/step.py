"""The jitted train and evaluation steps, pure functions over explicit pytrees.

The model is held as ``(graphdef, base)`` with ``base`` a plain dict of arrays
(``nnx.to_pure_dict``). What trains is split out of everything that does not:

  ``TrainState.params = {"method": <the method's params>, "base": <trained base leaves, None elsewhere>}``

so frozen weights are never differentiated, never get optimizer state and are never written
(they are a separate, non-donated argument).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxcl.methods.base import Method, MethodState, StepContext


class TrainState(NamedTuple):
    params: dict        # {"method": ..., "base": ...}; frozen base leaves are None
    opt_state: Any
    ctx: StepContext    # the task being trained and the step counters


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


def answer_positions(loss_mask: jax.Array, max_targets: int) -> tuple[jax.Array, jax.Array]:
    """Where the answer tokens of decoder-only rows are predicted, at most ``max_targets`` per row.

    Args:
      loss_mask: ``(B, S)`` 1 on answer tokens (and EOS).
      max_targets: static bound on a row's answer tokens.

    Returns:
      ``(positions, weights)``, both ``(B, max_targets)``: the hidden-state position predicting each
      answer token (``hidden[t]`` predicts token ``t + 1``) and its loss weight; unused slots have
      weight 0 (they point at position 0, which may itself predict a real token, so the weight
      comes from the slot's index, never from what sits at position 0).

    Examples:
      >>> pos, w = answer_positions(jnp.array([[0.0, 1.0, 1.0, 0.0]]), 3)
      >>> pos.tolist(), w.tolist()
      ([[0, 1, 0]], [[1.0, 1.0, 0.0]])
    """
    predicts = loss_mask[:, 1:]
    where = jax.vmap(lambda m: jnp.nonzero(m, size=max_targets, fill_value=0)[0])(predicts)
    count = jnp.sum(predicts > 0, axis=1, keepdims=True)
    used = jnp.arange(max_targets)[None] < count
    weights = jnp.where(used, jnp.take_along_axis(predicts, where, axis=1), 0.0)
    return where, weights.astype(jnp.float32)


def answer_nll(model: nnx.Module, batch: dict, adapter: Any, max_targets: int) -> tuple[jax.Array, jax.Array]:
    """Summed negative log-likelihood of the answer tokens and their (weighted) count.

    Decoder-only batches: ``input_ids, attention_mask, loss_mask`` (B, S). The LM head is applied
    only at the ``max_targets`` positions per example that predict an answer token, not over the
    whole sequence (the vocabulary projection dominates the cost of a short-answer step otherwise).
    Encoder-decoder batches: ``input_ids, attention_mask, decoder_input_ids, decoder_mask, labels``.
    """
    if model.is_encoder_decoder:
        logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                       batch["decoder_mask"], adapter=adapter)
        targets, weights = batch["labels"], batch["loss_mask"].astype(jnp.float32)
    else:
        hidden = model.hidden(batch["input_ids"], batch["attention_mask"], adapter=adapter)
        where, weights = answer_positions(batch["loss_mask"], max_targets)
        targets = jnp.take_along_axis(batch["input_ids"][:, 1:], where, axis=1)
        logits = model.logits(jnp.take_along_axis(hidden[:, :-1], where[..., None], axis=1))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights), jnp.sum(weights)


def answer_tokens(batch: dict, encoder_decoder: bool, max_targets: int) -> jax.Array:
    """The (weighted) number of answer tokens of a batch: what ``answer_nll`` divides by."""
    if encoder_decoder:
        return jnp.sum(batch["loss_mask"].astype(jnp.float32))
    return jnp.sum(answer_positions(batch["loss_mask"], max_targets)[1])


def _loss(params, frozen_base, fixed, batch, key, ctx, tokens, num_micro, *, graphdef, method, max_targets):
    """One micro-batch's share of the step's loss: its summed NLL over the step's answer tokens,
    plus its share of the method's regulariser."""
    base = merge_base(params["base"], frozen_base)
    model = bind(graphdef, base)
    state = MethodState(params["method"], fixed)
    adapter = method.adapter(state, method.train_ctx(model, state, batch, ctx), key)
    nll, _ = answer_nll(model, batch, adapter, max_targets)
    ce = nll / jnp.maximum(tokens, 1.0)
    return ce + method.extra_loss(model, state, batch, ctx) / num_micro, ce


def train_step(tstate: TrainState, frozen_base: dict, fixed: Any, batch: dict, key: jax.Array, *,
               graphdef, method: Method, make_tx: Callable[[Any], optax.GradientTransformation],
               max_targets: int):
    """One optimizer step over ``batch`` whose arrays have a leading (grad_accum,) axis.

    Gradient accumulation sums the token NLL over the micro-batches and divides once by the answer
    tokens of the whole step, so it equals one big batch exactly, also when micro-batches hold
    different numbers of answer tokens. ``make_tx(num_steps)`` builds the optimizer for this task's
    length (traced: one program for tasks of any length).

    Returns the new state and ``{"loss", "ce"}`` (plus the method's ``step_metrics``, and for
    methods that train base weights ``"base_changed"``: the share of those entries this step changed).
    """
    num_micro = jax.tree.leaves(batch)[0].shape[0]
    encoder_decoder = "decoder_input_ids" in batch
    tokens = jax.vmap(lambda mb: answer_tokens(mb, encoder_decoder, max_targets))(batch).sum()
    grad_fn = jax.value_and_grad(functools.partial(_loss, graphdef=graphdef, method=method, max_targets=max_targets),
                                 has_aux=True)

    def micro(acc, inputs):
        mb, i = inputs
        (loss, ce), g = grad_fn(tstate.params, frozen_base, fixed, mb, jax.random.fold_in(key, i), tstate.ctx,
                                tokens, num_micro)
        return jax.tree.map(jnp.add, acc, (g, loss, ce)), None

    zeros = (jax.tree.map(jnp.zeros_like, tstate.params), jnp.zeros(()), jnp.zeros(()))
    (grads, loss, ce), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(num_micro)))
    old = MethodState(tstate.params["method"], fixed)
    grads = method.transform_grads(grads, old, jax.random.fold_in(key, num_micro), tstate.ctx)
    tx = make_tx(tstate.ctx.num_steps)
    updates, opt_state = tx.update(grads, tstate.opt_state, tstate.params)
    params = optax.apply_updates(tstate.params, updates)
    new = method.post_update(MethodState(params["method"], fixed), tstate.ctx)
    params = dict(params, method=new.params)
    metrics = {"loss": loss, "ce": ce} | method.step_metrics(old, new)
    old_base, new_base = jax.tree.leaves(tstate.params["base"]), jax.tree.leaves(params["base"])
    if old_base:
        # float32 counts: an int32 sum overflows past 2**31 entries (full fine-tuning of a 7B model)
        changed = sum(jnp.sum(a != b, dtype=jnp.float32) for a, b in zip(old_base, new_base))
        metrics["base_changed"] = changed / sum(a.size for a in old_base)
    return TrainState(params, opt_state, tstate.ctx.advance()), metrics


def generate_step(params, frozen_base, fixed, batch, *, graphdef, method: Method, max_new_tokens: int,
                  eos_token_id: tuple[int, ...]):
    """Greedy continuation ids (B, max_new_tokens) of a left-padded (decoder-only) evaluation batch
    (``input_ids``, ``attention_mask``, ``task_ids``)."""
    model = bind(graphdef, merge_base(params["base"], frozen_base))
    state = MethodState(params["method"], fixed)
    adapter = method.adapter(state, method.eval_ctx(model, state, batch), None)
    return model.generate_ids(batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                              eos_token_id=eos_token_id, adapter=adapter)


def route_step(params, frozen_base, fixed, batch, *, graphdef, method: Method):
    """The task (B,) a routing method picks for each prompt of a left-padded batch."""
    model = bind(graphdef, merge_base(params["base"], frozen_base))
    return method.route(model, MethodState(params["method"], fixed), batch)


def eval_nll(params, frozen_base, fixed, batch, ctx: StepContext, *, graphdef, method: Method, max_targets: int):
    """Summed answer NLL and token count of a training-format batch, in the training context ``ctx``
    of the task just trained but without dropout (its validation loss)."""
    model = bind(graphdef, merge_base(params["base"], frozen_base))
    state = MethodState(params["method"], fixed)
    return answer_nll(model, batch, method.adapter(state, method.train_ctx(model, state, batch, ctx)), max_targets)
