"""MIST: mutual-information-guided sparse tuning of the backbone, as a plug-in to any method.

Math: docs/mist.md.

``MIST(inner=...)`` (config ``mist+<method>``, options as ``mist_*`` keys) runs the inner method
unchanged and, besides its parameters, trains a sparse, task-specific update of the backbone
weights at the sites ``sites``:

1. **Sensitivity**, at ``begin_task``, without updating any weight: an empirical Fisher score per
   weight entry, the sum over the task's training examples of the *per-example* squared gradient of
   a mutual-information objective. The objective is supervised InfoNCE (temperature 0.07) between
   two stochastic views of each prompt — two independent token-drop passes (each prompt token
   hidden from attention with probability ``token_drop``) — of the mean-pooled final hidden states,
   passed through a random, frozen projection head (Linear d→d, ReLU, Linear d→``head_dim``) and
   L2-normalised; positives are the rows with the same answer string. Example i's term is the loss
   of its two views as anchors, with the other examples' embeddings held fixed (they are its
   contrast set), so the gradients of different examples never mix before they are squared. The
   backbone is scored as it is (with the earlier tasks' sparse updates, without the inner method's
   adapter), always with masked attention: the token-drop views have holes that the fused
   attention paths cannot express. T5 pools the encoder output and adds the decoder's hidden state
   at its start token, so that decoder weights get scores too — all but the decoder
   self-attention's q and k, which a single token cannot reach (leave them out of ``sites``).
2. **Mask**: per weight matrix (every layer's slice of a stacked site weight), the
   ``n = round(fraction · d_in · d_out)`` entries with the highest scores. Layers that the inner
   method declares frozen (``frozen_below``: Any-SSR's router reads them) get no update at all.
3. **Sparse tuning**: the update is a float32 delta at the mask's entries, ``values (L, n)``,
   trained as the method's own parameters and added to the weight through the site's
   ``weight_fn``, ``W' = W + scatter(index, values) + Σ_{s<t} scatter(index_s, values_s)`` (formed
   in float32, then cast to the weight's dtype: the float32 delta is the master copy, so a
   bfloat16 model accumulates updates smaller than its rounding step as a float32 one does).
   ``transform_grads`` keeps each entry's gradient with probability ``keep_prob`` (= 1 − p,
   p = 0.9: ``sensitivity.drop_gradients``) and scales it by ``decay ** (number of earlier tasks
   whose mask held the entry)``. The base weights themselves are never written; checkpoints hold
   the deltas (index and values per task), not tuned copies of the weights.

Optimizers (``MIST.optimizer``): the delta gets its own SGD (lr ``backbone_lr`` = 1e-4, momentum
``backbone_momentum`` = 0.9, no weight decay) while the inner method keeps the run's optimizer;
``backbone_lr=None`` gives the delta the run's optimizer too. With plain SGD an entry moves only on
the steps where its gradient is kept, so about ``fraction · keep_prob`` of the site weights change
per step; with momentum or Adam an entry whose gradient was kept once keeps moving through the
optimizer state (the engine logs the measured share as ``backbone_changed`` in ``log.jsonl``).

State: params ``MISTParams(inner, values={site: (L, n)})``; fixed ``MISTFixed(inner, index={site:
(L, n)}, scale={site: (L, n)}, past_index={site: (L, T, n)}, past_values={site: (L, T, n)},
overlap (T, T), matrix_size={site: ()})`` — ``overlap[t, s]`` is the share of task t's mask that task
s < t also chose.

References:
  MIST: mutual-information-guided sparse tuning for continual learning (official code:
  github.com/zhwhu/MIST, for vision transformers; jaxcl adapts it to LLM projections).
  Supervised contrastive loss: Khosla et al., 2020, https://arxiv.org/abs/2004.11362.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional, final

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxcl.kernels import sensitivity
from jaxcl.methods.axes import logical
from jaxcl.methods.base import Method, MethodState, TaskInfo, Wrapper
from jaxcl.methods.features import pooled_features
from jaxcl.methods.seq_lora import SeqLoRA
from jaxcl.models.sites import Adapter, SiteHook, combine, resolve_sites

LLAMA_PROJECTIONS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


class MISTParams(NamedTuple):
    inner: Any
    values: dict


class MISTFixed(NamedTuple):
    inner: Any
    index: dict
    scale: dict
    past_index: dict
    past_values: dict
    overlap: jax.Array
    matrix_size: dict   # {site: ()} d_in · d_out of the site's weight


# -- the backbone update at a site ----------------------------------------------------------------
def _updated_weight(name: str, p: dict, w: jax.Array, ctx: Any) -> jax.Array:
    """``W`` plus the sparse float32 deltas of ``p`` (per layer: ``index``/``values`` (n,), the past
    tasks' ``past_index``/``past_values`` (T, n), or a ``dense`` delta while scoring)."""
    del name, ctx
    flat = jnp.zeros((w.size,), jnp.float32)
    if "past_index" in p:
        flat = flat.at[p["past_index"].reshape(-1)].add(p["past_values"].reshape(-1))
    if "index" in p:
        flat = flat.at[p["index"]].add(p["values"])
    delta = flat.reshape(w.shape)
    if "dense" in p:
        delta = delta + p["dense"]
    return (w.astype(jnp.float32) + delta).astype(w.dtype)


_HOOK = SiteHook(weight_fn=_updated_weight)


def answer_labels(answers: jax.Array) -> jax.Array:
    """``(B,)`` int32 class ids: the index of the first row holding the same answer.

    Args:
      answers: ``(B, A)`` answer token ids, aligned at position 0 and padded with -1.
    """
    same = jnp.all(answers[:, None, :] == answers[None, :, :], axis=-1)
    return jnp.argmax(same, axis=1).astype(jnp.int32)


def _token_drop(key: jax.Array, mask: jax.Array, rate: float) -> jax.Array:
    """``mask`` with each token dropped with probability ``rate``; a row never loses all its tokens."""
    kept = mask & jax.random.bernoulli(key, 1.0 - rate, mask.shape)
    return jnp.where(jnp.any(kept, axis=1, keepdims=True), kept, mask)


def _projection_head(key: jax.Array, features: jax.Array, head_dim: int) -> jax.Array:
    """A random, frozen two-layer head (He-normal init, no biases): ``relu(f W1) W2``."""
    k1, k2 = jax.random.split(key)
    width = features.shape[-1]
    w1 = jax.random.normal(k1, (width, width)) * np.sqrt(2.0 / width)
    w2 = jax.random.normal(k2, (width, head_dim)) * np.sqrt(1.0 / width)
    return jax.nn.relu(features @ w1) @ w2


def _prompt_and_answers(batch: dict, encoder_decoder: bool) -> tuple[jax.Array, jax.Array]:
    """Prompt-token mask (B, S) bool and aligned answer ids (B, A) padded with -1 of a training batch."""
    if encoder_decoder:
        answers = jnp.where(batch["decoder_mask"] > 0, batch["labels"], -1)
        return batch["attention_mask"] > 0, answers
    answer = batch["loss_mask"] > 0
    prompt = (batch["attention_mask"] > 0) & ~answer
    length = answer.shape[1]
    where = jax.vmap(lambda m: jnp.nonzero(m, size=length, fill_value=0)[0])(answer)
    count = jnp.sum(answer, axis=1, keepdims=True)
    tokens = jnp.take_along_axis(batch["input_ids"], where, axis=1)
    return prompt, jnp.where(jnp.arange(length)[None] < count, tokens, -1)


def _contrastive_views(weights, past: dict, batch: dict, key: jax.Array, head_key: jax.Array, *, graphdef,
                       token_drop: float, head_dim: int):
    """What both scorings share: ``(ids (B, S), views (2, B, S) bool, labels (2B,), embed)``, where
    ``embed(delta, ids, masks)`` is the projected, pooled embedding of the backbone as tuned (the
    earlier tasks' updates in ``past``) plus a dense delta."""
    model = nnx.merge(graphdef, weights)
    prompt, answers = _prompt_and_answers(batch, model.is_encoder_decoder)
    labels = answer_labels(answers)
    views = jnp.stack([_token_drop(jax.random.fold_in(key, v), prompt, token_drop) for v in range(2)])

    def embed(delta, ids, masks):
        params = {site: dict(past[site], dense=delta[site]) for site in delta}
        return _projection_head(head_key, pooled_features(model, ids, masks, Adapter(_HOOK, params)), head_dim)

    return batch["input_ids"], views, jnp.concatenate([labels, labels]), embed


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "token_drop", "head_dim", "chunk"))
def per_example_squared_grads(weights, dense: dict, past: dict, batch: dict, key: jax.Array, head_key: jax.Array, *,
                              graphdef, temperature: float, token_drop: float, head_dim: int, chunk: int) -> dict:
    """``Σ_i (∂ℓ_i/∂W)²`` over the rows i of ``batch``, per entry of each site's weight.

    Args:
      weights: the model's NNX state (``nnx.split``).
      dense: ``{site: (L, d_in, d_out)}`` float32 zeros: the gradient w.r.t. a delta at 0 is the
        gradient w.r.t. the weight.
      past: ``{site: {"past_index", "past_values"}}`` the earlier tasks' updates (the backbone as tuned).
      batch: a training batch of B real rows (B a multiple of ``chunk``).
      key: PRNG key of the two views; head_key: of the projection head (one per task).
      graphdef: the model's graph definition (masked attention).
      temperature, token_drop, head_dim: see ``MIST``.
      chunk: examples whose gradients are formed at once (memory: ``chunk`` x the tuned weights).

    Returns:
      ``{site: (L, d_in, d_out)}`` float32.
    """
    ids, views, labels, embed = _contrastive_views(weights, past, batch, key, head_key, graphdef=graphdef,
                                                   token_drop=token_drop, head_dim=head_dim)
    rows = ids.shape[0]
    contrast = jax.lax.stop_gradient(embed(dense, jnp.concatenate([ids, ids]), views.reshape(2 * rows, -1)))

    def squared(i):
        def own_terms(delta):
            live = embed(delta, jnp.stack([ids[i], ids[i]]), views[:, i])
            z = contrast.at[i].set(live[0]).at[rows + i].set(live[1])
            per_anchor = sensitivity.info_nce_per_anchor(z, labels, temperature)
            return 0.5 * (per_anchor[i] + per_anchor[rows + i])

        return jax.tree.map(jnp.square, jax.grad(own_terms)(dense))

    def accumulate(total, group):
        return jax.tree.map(lambda t, g: t + jnp.sum(g, axis=0), total, jax.vmap(squared)(group)), None

    total, _ = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, dense), jnp.arange(rows).reshape(-1, chunk))
    return total


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "token_drop", "head_dim"))
def batch_squared_grads(weights, dense: dict, past: dict, batch: dict, key: jax.Array, head_key: jax.Array, *,
                        graphdef, temperature: float, token_drop: float, head_dim: int) -> dict:
    """``(∂L/∂W)²`` per entry, ``L`` the batch's InfoNCE loss (the mean over its 2B anchors): the
    official code's score of one batch, one backward pass. Arguments as ``per_example_squared_grads``.

    Returns:
      ``{site: (L, d_in, d_out)}`` float32.
    """
    ids, views, labels, embed = _contrastive_views(weights, past, batch, key, head_key, graphdef=graphdef,
                                                   token_drop=token_drop, head_dim=head_dim)
    rows = ids.shape[0]

    def loss(delta):
        z = embed(delta, jnp.concatenate([ids, ids]), views.reshape(2 * rows, -1))
        return jnp.mean(sensitivity.info_nce_per_anchor(z, labels, temperature))

    return jax.tree.map(jnp.square, jax.grad(loss)(dense))


@functools.partial(jax.jit, static_argnames=("count",))
def top_entries(scores: jax.Array, count: int) -> jax.Array:
    """``(L, count)`` int32 flat positions of each layer's ``count`` highest scores (ties: lower
    position first), sorted."""
    # top_k, not a full argsort: the same choice (top_k puts the lower index first among equals) in
    # a fraction of the memory (a GPU argsort of SmolLM2's MLP scores asked for 7.3 GiB)
    _, order = jax.lax.top_k(scores.reshape(scores.shape[0], -1), count)
    return jnp.sort(order, axis=1).astype(jnp.int32)


@jax.jit
def _earlier_choices(index: jax.Array, past_index: jax.Array, task: jax.Array) -> jax.Array:
    """``(L, T, n)`` bool: whether each entry of the current mask (L, n) is in task s's mask, for s < task."""
    # binary search, not isin's default all-pairs compare: that one is (n, n) per layer and task,
    # which XLA:CPU materialises (113 GiB for SmolLM2's 5 % masks)
    def layer(idx, past):  # (n,), (T, n)
        return jax.vmap(lambda p: jnp.isin(idx, p, method="binary_search"))(past)
    found = jax.vmap(layer)(index, past_index)
    return found & (jnp.arange(past_index.shape[1]) < task)[None, :, None]


def _split_optimizer(inner: optax.GradientTransformation,
                     delta: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` on ``{"method": params.inner, "base": ...}`` (exactly the tree it would see without
    MIST) and ``delta`` on the sparse update's values; state ``(inner state, delta state)``."""
    def parts(tree):
        return {"method": tree["method"].inner, "base": tree["base"]}, tree["method"].values

    def init(params):
        inner_params, values = parts(params)
        return inner.init(inner_params), delta.init(values)

    def update(grads, state, params=None):
        inner_grads, value_grads = parts(grads)
        inner_params, values = (None, None) if params is None else parts(params)
        inner_updates, inner_state = inner.update(inner_grads, state[0], inner_params)
        value_updates, delta_state = delta.update(value_grads, state[1], values)
        return {"method": MISTParams(inner_updates["method"], value_updates), "base": inner_updates["base"]}, \
            (inner_state, delta_state)

    return optax.GradientTransformation(init, update)


@final
@dataclasses.dataclass(frozen=True)
class MIST(Wrapper):
    """Sparse, MI-guided backbone tuning around ``inner`` (any method).

    Attributes:
      inner: the wrapped method (``mist+<name>`` builds it from the other ``method_args``).
      sites: site names or suffixes whose backbone weights are tuned (``models.sites.resolve_sites``;
        by default every Llama projection; for T5 e.g. ``attn.q`` picks every attention's q, and
        ``mlp.wi_0``/``mlp.wo`` its MLPs).
      fraction: k, the share of each weight matrix in the task's mask (5%; the official configs 10%).
      keep_prob: probability of keeping a masked gradient entry on a step (1 − p, p = 0.9).
      decay: gradient scale per earlier task that chose the entry (0.9).
      temperature: InfoNCE temperature.
      token_drop: probability of hiding each prompt token in a view.
      head_dim: output width of the random projection head.
      batch_size: examples per InfoNCE batch (the contrast set of each example).
      per_example_chunk: examples whose gradients are formed at once in the sensitivity pass
        (memory: that many x the tuned weights, in float32); divides ``batch_size``.
      sensitivity_examples: score on the first this many training examples; 0 = all.
      scoring: ``"per_example"`` (default) sums each example's squared gradient, so that examples'
        gradients cannot cancel before they are squared (about three training steps of compute per
        batch of rows); ``"batch"`` sums each InfoNCE batch's squared gradient, as the official
        code does (one backward pass per batch).
      backbone_lr: learning rate of the delta's own SGD; None = the run's optimizer for it too.
      backbone_momentum: momentum of that SGD (0 = plain SGD).
    """

    inner: Method = dataclasses.field(default_factory=SeqLoRA)
    sites: tuple = LLAMA_PROJECTIONS
    fraction: float = 0.05
    keep_prob: float = 0.1
    decay: float = 0.9
    temperature: float = 0.07
    token_drop: float = 0.1
    head_dim: int = 128
    batch_size: int = 16
    per_example_chunk: int = 4
    sensitivity_examples: int = 0
    scoring: str = "per_example"
    backbone_lr: Optional[float] = 1e-4
    backbone_momentum: float = 0.9
    name = "mist"

    def __post_init__(self):
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"mist fraction must be in (0, 1], got {self.fraction}")
        if not 0.0 < self.keep_prob <= 1.0:
            raise ValueError(f"mist keep_prob must be in (0, 1], got {self.keep_prob}")
        if not 0.0 <= self.token_drop < 1.0:
            raise ValueError(f"mist token_drop must be in [0, 1), got {self.token_drop}")
        if not self.sites:
            raise ValueError("mist sites must name at least one site")
        if self.batch_size < 2 or self.sensitivity_examples < 0:
            raise ValueError(f"mist batch_size must be >= 2 and sensitivity_examples >= 0, got "
                             f"{self.batch_size}, {self.sensitivity_examples}")
        if self.scoring not in ("per_example", "batch"):
            raise ValueError(f"mist scoring must be 'per_example' or 'batch', got {self.scoring!r}")
        if self.per_example_chunk < 1 or self.batch_size % self.per_example_chunk:
            raise ValueError(f"mist per_example_chunk ({self.per_example_chunk}) must divide batch_size "
                             f"({self.batch_size})")

    # -- state -----------------------------------------------------------------------------------
    def init(self, key, model, num_tasks):
        sites = resolve_sites(model.site_shapes, self.sites)
        inner = self.inner.init(key, model, num_tasks)
        values, index, scale, past_index, past_values = {}, {}, {}, {}, {}
        for site in sites:
            num_layers, d_in, d_out = model.site_shapes[site]
            n = max(1, round(self.fraction * d_in * d_out))
            values[site] = logical(jnp.zeros((num_layers, n)), ("layers", "mask"))
            index[site] = logical(jnp.zeros((num_layers, n), jnp.int32), ("layers", "mask"))
            scale[site] = logical(jnp.zeros((num_layers, n)), ("layers", "mask"))
            past_index[site] = logical(jnp.zeros((num_layers, num_tasks, n), jnp.int32), ("layers", "tasks", "mask"))
            past_values[site] = logical(jnp.zeros((num_layers, num_tasks, n)), ("layers", "tasks", "mask"))
        overlap = logical(jnp.zeros((num_tasks, num_tasks)), ("tasks", None))
        sizes = {site: logical(jnp.int32(model.site_shapes[site][1] * model.site_shapes[site][2]), ()) for site in sites}
        return MethodState(MISTParams(inner.params, values),
                           MISTFixed(inner.fixed, index, scale, past_index, past_values, overlap, sizes))

    @staticmethod
    def _inner(state: MethodState) -> MethodState:
        return MethodState(state.params.inner, state.fixed.inner)

    @staticmethod
    def _outer(inner: MethodState, state: MethodState) -> MethodState:
        return MethodState(state.params._replace(inner=inner.params), state.fixed._replace(inner=inner.fixed))

    # -- tasks -----------------------------------------------------------------------------------
    def begin_task(self, key, state, task: TaskInfo):
        key_inner, key_mi = jax.random.split(key)
        state = self._outer(self.inner.begin_task(key_inner, self._inner(state), task), state)
        if task.model is None or task.batches is None:
            raise ValueError("mist.begin_task needs TaskInfo.model and TaskInfo.batches to score sensitivity")
        scores = self.sensitivity(key_mi, task, state)
        fixed = state.fixed
        t = jnp.int32(task.index)
        index, scale, shared, chosen = {}, {}, 0.0, 0.0
        row = jnp.zeros(fixed.overlap.shape[1])
        for site, s in scores.items():
            num_layers, n = fixed.index[site].shape
            index[site] = top_entries(s, n)
            earlier = _earlier_choices(index[site], fixed.past_index[site], t)      # (L, T, n)
            tuned = (jnp.arange(num_layers) >= self.frozen_below(num_layers)).astype(jnp.float32)[:, None]
            scale[site] = tuned * jnp.power(jnp.float32(self.decay), jnp.sum(earlier, axis=1, dtype=jnp.float32))
            row = row + jnp.sum(earlier * tuned[:, :, None], axis=(0, 2), dtype=jnp.float32)
            chosen = chosen + jnp.sum(tuned) * n
        row = (row / jnp.maximum(chosen, 1.0)).at[t].set(1.0)
        values = jax.tree.map(jnp.zeros_like, state.params.values)
        fixed = fixed._replace(index=index, scale=scale, overlap=fixed.overlap.at[t].set(row))
        return MethodState(state.params._replace(values=values), fixed)

    def end_task(self, state, task):
        state = self._outer(self.inner.end_task(self._inner(state), task), state)
        fixed = state.fixed
        past_index = {s: fixed.past_index[s].at[:, task.index].set(fixed.index[s]) for s in fixed.index}
        past_values = {s: fixed.past_values[s].at[:, task.index].set(state.params.values[s]) for s in fixed.index}
        values = jax.tree.map(jnp.zeros_like, state.params.values)
        return MethodState(state.params._replace(values=values),
                           fixed._replace(past_index=past_index, past_values=past_values))

    def sensitivity(self, key: jax.Array, task: TaskInfo, state: MethodState) -> dict:
        """``{site: (L, d_in, d_out)}`` empirical-Fisher scores of the MI objective on ``task``'s data:
        the mean over examples of per-example squared gradients, or (``scoring="batch"``) the mean
        over batches of the batch gradient's square."""
        model = nnx.merge(*nnx.split(task.model))
        model.attention = None  # token-drop views have holes: masked attention only
        graphdef, weights = nnx.split(model)
        shapes = model.site_shapes()
        dense = {site: jnp.zeros(shapes[site], jnp.float32) for site in state.fixed.index}
        past = {site: {"past_index": state.fixed.past_index[site], "past_values": state.fixed.past_values[site]}
                for site in dense}
        batches, count = self._scoring_batches(task)
        if not batches:
            raise ValueError(f"mist: task {task.name!r} has no training batch to score sensitivity on")
        key_views, key_head = jax.random.split(key)
        total = None
        options = dict(graphdef=graphdef, temperature=self.temperature, token_drop=self.token_drop, head_dim=self.head_dim)
        for i, batch in enumerate(batches):
            if self.scoring == "batch":
                sq = batch_squared_grads(weights, dense, past, batch, jax.random.fold_in(key_views, i), key_head, **options)
            else:
                sq = per_example_squared_grads(weights, dense, past, batch, jax.random.fold_in(key_views, i), key_head,
                                               chunk=self.per_example_chunk, **options)
            total = sq if total is None else jax.tree.map(jnp.add, total, sq)
        return sensitivity.fisher_scores(total, len(batches) if self.scoring == "batch" else count)

    def _scoring_batches(self, task: TaskInfo) -> tuple[list, int]:
        """The task's real training rows (up to ``sensitivity_examples``) in InfoNCE batches of
        ``batch_size`` rows, and the number of distinct rows. The pipeline's batches all have one
        length, so scoring compiles once; the last batch is filled up with repeats of its own rows
        (a repeated example counts twice)."""
        rows = []
        for batch in task.batches():
            real = np.asarray(batch["real"], bool)
            rows.append({k: np.asarray(v)[real] for k, v in batch.items() if k not in ("real", "task_ids")})
            if self.sensitivity_examples and sum(len(r["input_ids"]) for r in rows) >= self.sensitivity_examples:
                break
        if not rows:
            return [], 0
        rows = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        count = len(rows["input_ids"])
        if self.sensitivity_examples:
            count = min(count, self.sensitivity_examples)
        batches = []
        for start in range(0, count, self.batch_size):
            index = start + np.arange(self.batch_size) % min(self.batch_size, count - start)
            batches.append({k: jnp.asarray(v[index]) for k, v in rows.items()})
        return batches, count

    # -- training --------------------------------------------------------------------------------
    def adapter(self, state, ctx, key=None):
        fixed = state.fixed
        params = {site: {"index": fixed.index[site], "values": state.params.values[site],
                         "past_index": fixed.past_index[site], "past_values": fixed.past_values[site]}
                  for site in fixed.index}
        return combine(self.inner.adapter(self._inner(state), ctx, key), Adapter(_HOOK, params))

    def train_ctx(self, model, state, batch, step):
        return self.inner.train_ctx(model, self._inner(state), batch, step)

    def eval_ctx(self, model, state, batch):
        return self.inner.eval_ctx(model, self._inner(state), batch)

    def route(self, model, state, batch):
        return self.inner.route(model, self._inner(state), batch)

    def extra_loss(self, model, state, batch, step):
        return self.inner.extra_loss(model, self._inner(state), batch, step)

    def optimizer(self, tx):
        inner = self.inner.optimizer(tx)
        if self.backbone_lr is None:
            delta = tx
        else:
            delta = optax.sgd(self.backbone_lr, momentum=self.backbone_momentum or None)
        return _split_optimizer(inner, delta)

    def transform_grads(self, grads, state, key, step):
        key_inner, key_drop = jax.random.split(key)
        inner = self.inner.transform_grads({"method": grads["method"].inner, "base": grads["base"]},
                                           self._inner(state), key_inner, step)
        kept = sensitivity.drop_gradients(key_drop, grads["method"].values,
                                          {s: True for s in grads["method"].values}, self.keep_prob)
        values = {s: kept[s] * state.fixed.scale[s] for s in kept}
        return {"method": MISTParams(inner["method"], values), "base": inner["base"]}

    def post_update(self, state, step):
        return self._outer(self.inner.post_update(self._inner(state), step), state)

    def step_metrics(self, old, new):
        # float32 counts: an int32 sum overflows past 2**31 entries (a 7B model's projections)
        changed = sum(jnp.sum(old.params.values[s] != new.params.values[s], dtype=jnp.float32) for s in old.params.values)
        tuned = sum(v.shape[0] * new.fixed.matrix_size[s].astype(jnp.float32) for s, v in new.params.values.items())
        inner = self.inner.step_metrics(self._inner(old), self._inner(new))
        return dict(inner, backbone_changed=changed / tuned)

    def report(self, state):
        fixed = state.fixed
        t = int(np.max(np.nonzero(np.asarray(fixed.overlap).diagonal())[0], initial=0))
        sizes = {site: fixed.index[site].shape[0] * int(fixed.matrix_size[site]) for site in fixed.index}
        per_task = []
        for s in range(t + 1):
            chosen = sum(int(np.sum(np.asarray(fixed.past_values[site])[:, s] != 0)) for site in fixed.index)
            per_task.append(chosen / sum(sizes.values()))
        overlap = np.asarray(fixed.overlap)[: t + 1, : t + 1]
        return dict(self.inner.report(self._inner(state)), mist={
            "sites": sorted(fixed.index), "fraction": self.fraction, "keep_prob": self.keep_prob, "decay": self.decay,
            "tuned_weights": sum(sizes.values()),
            "mask_entries_per_layer": {site: int(fixed.index[site].shape[1]) for site in fixed.index},
            # share of the tuned weights each task's update actually changed (non-zero delta)
            "changed_share_per_task": per_task,
            # row t, column s <= t: share of task t's mask that task s also chose
            "mask_overlap": np.round(np.tril(overlap), 6).tolist(),
            "expected_share_changed_per_step_plain_sgd": self.fraction * self.keep_prob})
