"""Candidate fixes of SAPT's routing, as patches of ``jaxcl.methods.SAPT`` (experiment code, not
the library): ``apply(variant)`` switches them on for this process. Used by
``synthetic_variants.py`` (the CPU synthetic stream) and ``run_variant.py`` (an engine run).

Variants (keys of the ``variant`` dict):
  freeze_query: the query network gets no gradient after the first task (only keys learn).
  cosine: s · cos(query, key) logits with scale s instead of ``K q / sqrt(d)``.
  query_scale: the query network's gradient multiplied by this factor (a lower learning rate).
  noise, copies: ARM on ``copies`` fresh Gaussian copies of every stored pseudo-input a step, with
    ``noise`` times the task's per-dimension std of pooled inputs.
  center: pooled inputs minus the first task's mean (``"mean"``), or standardised (``"std"``).
  current_key_only: the current-task routing term trains the current key only.
  onehot_targets: ARM targets one-hot on the pseudo-input's own task instead of its mean attention.
  align_keys: at the end of a task its key is rescaled to the mean norm of the past keys (weight
    aligning against recency bias, Zhao et al. 2020).
  detach: the cross-entropy sends no gradient into the attention (the routing terms alone train it).
"""
import jax
import jax.numpy as jnp

from jaxcl.kernels import attention_select
from jaxcl.methods import SAPT
from jaxcl.methods import sapt as sapt_module

V, STATS = {}, {}
_begin, _end, _pooled, _train_ctx = SAPT.begin_task, SAPT.end_task, SAPT._pooled, SAPT.train_ctx


def _pooled_batches(model, batches):
    return jnp.concatenate([sapt_module.pool_embeddings(model.embed_inputs(jnp.asarray(b["input_ids"])),
                                                        sapt_module.input_mask({k: jnp.asarray(v) for k, v in b.items()}))
                            for b in batches])


def _normalise(e):
    if V.get("center") and STATS:
        e = e - STATS["mean"]
        if V["center"] == "std":
            e = e / STATS["std"]
    return e


def begin_task(self, key, state, task):
    if task.index == 0 and V.get("center"):
        e = _pooled_batches(task.model, task.batches())
        STATS.update(mean=e.mean(0), std=e.std(0) + 1e-6)
    return _begin(self, key, state, task)


def end_task(self, state, task):
    c = task.index
    if V.get("align_keys") and c > 0:  # before the task's mean attention and pseudo-inputs are taken
        past = jnp.mean(jnp.linalg.norm(state.fixed.keys[:c], axis=1))
        key = state.params.key
        state = state._replace(params=state.params._replace(key=key * past / jnp.linalg.norm(key)))
    state = _end(self, state, task)
    f = state.fixed
    if c + 1 < task.num_tasks and (V.get("center") or V.get("noise")):
        pseudo = jnp.where(f.pseudo_valid[c][:, None] > 0, _normalise(f.pseudo[c]), 0.0)
        valid = f.pseudo_valid
        if V.get("noise"):  # the task's spread rides in the last (unused) pseudo-input row
            pseudo = pseudo.at[-1].set(jnp.std(_normalise(_pooled_batches(task.model, task.batches())), axis=0))
            valid = valid.at[c, -1].set(0.0)
        state = state._replace(fixed=f._replace(pseudo=f.pseudo.at[c].set(pseudo), pseudo_valid=valid))
    return state


def train_ctx(self, model, state, batch, step):
    ctx = _train_ctx(self, model, state, batch, step)
    return jax.lax.stop_gradient(ctx) if V.get("detach") else ctx


def pooled(self, model, batch):
    return _normalise(_pooled(self, model, batch))


def scores(self, state, e, current):
    fixed, params = state.fixed, state.params
    if current is not None and (V.get("freeze_query") or V.get("query_scale")):
        scale = jnp.where(current > 0, 0.0, 1.0) if V.get("freeze_query") else V["query_scale"]
        params = params._replace(query=jax.tree.map(lambda p: jax.lax.stop_gradient(p) * (1 - scale) + p * scale,
                                                    params.query))
    q = attention_select.query(params.query, e)
    rows = jnp.arange(fixed.keys.shape[0])
    if current is None:
        keys, active = fixed.keys, fixed.seen
    else:
        keys, active = jnp.where((rows == current)[:, None], params.key[None], fixed.keys), rows <= current
    if V.get("cosine"):
        cos = (q / jnp.linalg.norm(q, axis=-1, keepdims=True)) @ (keys / jnp.linalg.norm(keys, axis=1, keepdims=True)).T
        return jnp.where(active, V["cosine"] * cos, -jnp.inf)
    return attention_select.attention_logits(keys, q, active)


def extra_loss(self, model, state, batch, step):
    fixed = state.fixed
    num_tasks, _, d = fixed.pseudo.shape
    pseudo, valid = fixed.pseudo, fixed.pseudo_valid
    if V.get("noise"):
        copies = V.get("copies", 4)
        noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(fixed.seed), step.total_step),
                                  (copies,) + pseudo.shape)
        pseudo = pseudo[None] + V["noise"] * pseudo[None, :, -1:, :] * noise
        pseudo, valid = jnp.moveaxis(pseudo, 0, 1).reshape(num_tasks, -1, d), jnp.tile(valid, (1, copies))
    n = pseudo.shape[1]
    targets = jnp.eye(num_tasks) if V.get("onehot_targets") else fixed.targets
    per_input = jax.vmap(lambda s, t: attention_select.kl_to_target(s[None], t))(
        self._scores(state, pseudo.reshape(-1, d), step.task), jnp.repeat(targets, n, axis=0))
    weights = valid * (jnp.arange(num_tasks) < step.task).astype(jnp.float32)[:, None]
    per_task = jnp.sum(per_input.reshape(num_tasks, n) * weights, axis=1)
    loss = self.kl_ratio * jnp.sum(per_task / jnp.maximum(jnp.sum(weights, axis=1), 1.0))
    own_state = state
    if V.get("current_key_only"):
        own_state = state._replace(params=state.params._replace(query=jax.lax.stop_gradient(state.params.query)))
    s = self._scores(own_state, self._pooled(model, batch), step.task)
    per_row = jax.vmap(lambda x: attention_select.kl_to_target(x[None], jax.nn.one_hot(step.task, s.shape[1])))(s)
    rows = ((batch["task_ids"] == step.task) & (jnp.sum(batch["loss_mask"], axis=1) > 0)).astype(jnp.float32)
    return loss + self.current_ratio * jnp.sum(per_row * rows) / jnp.maximum(jnp.sum(rows), 1.0)


SAPT.begin_task, SAPT.end_task, SAPT._pooled, SAPT._scores, SAPT.extra_loss, SAPT.train_ctx = (
    begin_task, end_task, pooled, scores, extra_loss, train_ctx)


def apply(variant: dict) -> None:
    """Use ``variant`` (the keys above) from now on in this process."""
    V.clear(), STATS.clear(), V.update(variant)
