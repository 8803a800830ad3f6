"""MIST: mutual-information-guided sparse tuning of the backbone, as a plug-in to any method.

``MIST(inner=...)`` (config ``mist+<method>``, options as ``mist_*`` keys) runs the inner method
unchanged and, besides its parameters, also trains a sparse, task-specific part of the backbone
weights of the sites whose names end with one of ``sites`` (DESIGN §6):

1. Sensitivity, at ``begin_task``, without updating any weight: the squared gradients of a mutual
   information objective w.r.t. the site weights, summed over batches of ``batch_size`` training
   examples and divided by their number (``kernels.sensitivity``): supervised InfoNCE (temperature
   0.07) between two stochastic views of each prompt — two independent token-drop passes (each
   prompt token hidden from attention with probability ``token_drop``) — of the mean-pooled final
   hidden states, passed through a random, frozen projection head (Linear d→d, ReLU, Linear
   d→``head_dim``) and L2-normalised. Positives are the examples of the batch with the same answer
   string. The backbone is scored as it is (with the earlier tasks' sparse updates, without the
   inner method's adapter). T5 pools the encoder output and adds the decoder's hidden state at its
   start token, so that decoder weights get scores too — all but the decoder self-attention's q and
   k, which a single token cannot reach (their scores are 0 and the mask falls back to the first
   entries: leave them out of ``sites`` for T5).
2. Mask: per weight matrix (every layer's slice of a stacked site weight), the entries whose score is
   ≥ the (1 − ``fraction``) quantile (``sensitivity.topk_mask``: exactly ``round(fraction · size)``).
3. Sparse tuning: the site weights are trainable base leaves (``base_trainable``) and
   ``transform_grads`` zeroes their gradient outside the mask, keeps each masked entry with
   probability ``keep_prob`` (= 1 − p, p = 0.9: ``sensitivity.drop_gradients``) and scales it by
   ``decay ** (number of earlier tasks whose mask held the entry)``.

Fixed state ``fixed["mist"]``: ``selected[site]`` (L, d_in, d_out) unsigned ints whose bit ``t`` says
task ``t``'s mask holds the entry (the mask history in one byte per entry for ≤ 8 tasks, two for
≤ 16, four for ≤ 32), ``task`` (), the current task, ``overlap`` (T, T): row t, column s < t is
the share of task t's mask also chosen by task s (the diagonal is 1), and from the first
``begin_task`` on ``index[site]`` (L, n): the flat positions of the current mask's n entries per
layer. ``report`` adds the overlap and mask shares to the inner method's report.

Optimizers (``MIST.optimizer``): the backbone part gets its own SGD (DESIGN: lr ``backbone_lr`` =
1e-4, momentum ``backbone_momentum`` = 0.9, no weight decay) while the inner method keeps the run's
optimizer; ``backbone_lr=None`` gives the backbone the run's optimizer too. What it does with the
gradients matters:
  * entries outside the mask never get a gradient, so they stay bit-identical under SGD, SGD with
    momentum or Adam — unless the run's optimizer with weight decay > 0 also drives the backbone;
  * with plain SGD (momentum 0) an entry moves only on the steps where its gradient is kept, so
    about ``fraction · keep_prob`` of the site weights change per step;
  * with momentum or Adam, an entry whose gradient was kept once keeps moving on later steps through
    the optimizer state, so up to ``fraction`` of the entries change per step (the engine logs the
    measured share as ``base_changed`` in ``log.jsonl``).

The inner method's state lives alongside: ``fixed`` holds the inner method's fixed state plus the
``"mist"`` key (so the inner method must not use that key); ``train`` is the inner method's.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxcl.kernels import sensitivity
from jaxcl.methods.base import Method, TaskInfo
from jaxcl.methods.lora_bank import select_sites
from jaxcl.methods.seq_lora import SeqLoRA

LLAMA_PROJECTIONS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def site_path(site: str) -> str:
    """The base-weight path (``nnx.to_pure_dict`` keys joined by ``/``) of a site's stacked weight.

    Llama keeps every projection in ``layers/<name>`` (``attn.q`` → ``layers/q``); T5 keeps them per
    stack with dots turned into underscores (``encoder.self_attn.q`` → ``encoder/layers/self_attn_q``).
    ``MIST.begin_task`` checks the result against the model.
    """
    stack, _, rest = site.partition(".")
    if stack in ("encoder", "decoder"):
        return f"{stack}/layers/{rest.replace('.', '_')}"
    return f"layers/{site.rpartition('.')[2]}"


def path_matches(path: str, pattern: str) -> bool:
    """Whether the base weight at ``path`` belongs to a site that ends with ``pattern``.

    ``base_trainable`` sees paths only, not site names: a path matches when it is the pattern's own
    path (Llama, or a full T5 name) or, for T5 layer weights, when its last part ends with the pattern
    (dots as underscores). ``MIST.begin_task`` checks that the matching paths are exactly the paths of
    the sites ``select_sites`` picks.
    """
    if path == site_path(pattern):
        return True
    parts = path.split("/")
    t5_layer = len(parts) == 3 and parts[0] in ("encoder", "decoder") and parts[1] == "layers"
    return t5_layer and parts[2].endswith(pattern.replace(".", "_"))


def _get(tree: dict, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _replace(tree: dict, path: str, value) -> dict:
    """A copy of the nested dict ``tree`` with the leaf at ``path`` replaced (other leaves shared)."""
    head, _, rest = path.partition("/")
    return dict(tree, **{head: _replace(tree[head], rest, value) if rest else value})


def _bits_dtype(num_tasks: int):
    for dtype in (jnp.uint8, jnp.uint16, jnp.uint32):
        if num_tasks <= jnp.iinfo(dtype).bits:
            return dtype
    raise ValueError(f"mist keeps one bit per task and supports at most 32 tasks; the stream has {num_tasks}")


def current_mask(selected: jax.Array, task: jax.Array) -> jax.Array:
    """Boolean mask of task ``task`` from the bit field ``selected``."""
    one = jnp.ones((), selected.dtype)
    return (jnp.right_shift(selected, task.astype(selected.dtype)) & one).astype(bool)


def earlier_count(selected: jax.Array, task: jax.Array) -> jax.Array:
    """How many tasks before ``task`` chose each entry (int32, shape of ``selected``)."""
    below = jnp.left_shift(jnp.ones((), selected.dtype), task.astype(selected.dtype)) - jnp.ones((), selected.dtype)
    return jax.lax.population_count(selected & below).astype(jnp.int32)


def mask_index(mask: jax.Array) -> jax.Array:
    """``(L, n)`` int32 flat positions of the ``n`` entries a per-layer mask ``(L, d_in, d_out)`` keeps
    in every layer (``topk_mask`` keeps the same count in each)."""
    flat = np.asarray(mask).reshape(mask.shape[0], -1)
    counts = flat.sum(axis=1)
    if np.any(counts != counts[0]):
        raise ValueError(f"mist: per-layer masks of unequal sizes {counts.tolist()}")
    return jnp.asarray(np.stack([np.flatnonzero(row) for row in flat]).astype(np.int32))


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


def _masked_mean(h: jax.Array, mask: jax.Array) -> jax.Array:
    h = h.astype(jnp.float32)
    total = jnp.sum(jnp.where(mask[..., None], h, 0.0), axis=1)
    return total / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1).astype(jnp.float32)


def prompt_mean(model, input_ids: jax.Array, prompt_mask: jax.Array) -> jax.Array:
    """``(B, d)`` float32 mean of the final hidden states (T5: encoder outputs) over the tokens marked by
    ``prompt_mask`` (bool, (B, S)); the other tokens are hidden from attention too."""
    attention = prompt_mask.astype(jnp.int32)
    states = model.encode(input_ids, attention) if model.is_encoder_decoder else model.hidden(input_ids, attention)
    return _masked_mean(states, prompt_mask)


def pooled_features(model, input_ids: jax.Array, prompt_mask: jax.Array) -> jax.Array:
    """``(B, F)`` features of the prompt tokens marked by ``prompt_mask`` (bool, (B, S)).

    Decoder-only: ``prompt_mean`` (F = d). T5: the mean over the encoder output, concatenated with the
    decoder's hidden state at its start token (F = 2d), so that decoder weights influence it too.
    """
    if not model.is_encoder_decoder:
        return prompt_mean(model, input_ids, prompt_mask)
    attention = prompt_mask.astype(jnp.int32)
    encoded = model.encode(input_ids, attention)
    start = jnp.full((input_ids.shape[0], 1), model.config.decoder_start_token_id, jnp.int32)
    first = model.decode_hidden(start, encoded, attention)[:, 0].astype(jnp.float32)
    return jnp.concatenate([_masked_mean(encoded, prompt_mask), first], axis=-1)


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


@functools.partial(jax.jit, static_argnames=("graphdef", "paths", "temperature", "token_drop", "head_dim"))
def squared_grads(weights: dict, base: dict, batch: dict, key: jax.Array, head_key: jax.Array, *, graphdef,
                  paths: tuple, temperature: float, token_drop: float, head_dim: int) -> tuple[dict, jax.Array]:
    """Squared gradient of the MI objective on one batch w.r.t. the site weights, and the objective.

    Args:
      weights: ``{site: stacked weight}`` to differentiate (the values of ``base`` at ``paths``).
      base: the model's pure parameter dict.
      batch: a training batch (real rows only).
      key: PRNG key of the two views of this batch.
      head_key: PRNG key of the projection head (one per task: the same head for all its batches).
      graphdef: the model's NNX graph definition.
      paths: ``((site, base path), ...)``.
      temperature, token_drop, head_dim: see ``MIST``.
    """
    def objective(weights):
        params = base
        for site, path in paths:
            params = _replace(params, path, weights[site])
        model = nnx.merge(graphdef, params)
        prompt, answers = _prompt_and_answers(batch, model.is_encoder_decoder)
        # Both views in one forward pass (one traced model, not two).
        views = jnp.concatenate([_token_drop(jax.random.fold_in(key, i), prompt, token_drop) for i in range(2)])
        features = pooled_features(model, jnp.concatenate([batch["input_ids"]] * 2), views)
        z1, z2 = jnp.split(_projection_head(head_key, features, head_dim), 2)
        return sensitivity.info_nce(z1, z2, answer_labels(answers), temperature)

    loss, grads = jax.value_and_grad(objective)(weights)
    return jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), grads), loss


@functools.partial(jax.jit, static_argnames=("fraction",))
def layer_masks(scores: dict, fraction: float) -> dict:
    """Per layer slice of each stacked ``(L, d_in, d_out)`` score array, the top-``fraction`` mask."""
    return jax.vmap(lambda s: sensitivity.topk_mask(s, fraction))(scores)


@dataclasses.dataclass(frozen=True)
class MIST(Method):
    """Sparse, MI-guided backbone tuning around ``inner`` (any method).

    Attributes:
      inner: the wrapped method (``mist+<name>`` builds it from the other ``method_args``).
      sites: site-name suffixes whose backbone weights are tuned (``lora_bank.select_sites``; by
        default every Llama projection; for T5 e.g. ``attn.q`` picks every attention's q, and
        ``mlp.wi_0``/``mlp.wo`` its MLPs).
      fraction: k, the share of each weight matrix in the task's mask (DESIGN: 5%; official 10%).
      keep_prob: probability of keeping a masked gradient entry on a step (1 − p, p = 0.9).
      decay: gradient scale per earlier task that chose the entry (0.9).
      temperature: InfoNCE temperature.
      token_drop: probability of hiding each prompt token in a view.
      head_dim: output width of the random projection head.
      batch_size: examples per InfoNCE batch (the other examples of a batch are the negatives;
        activation memory of the scoring pass grows with it).
      sensitivity_examples: score on the first this many training examples; 0 = all.
      backbone_lr: learning rate of the backbone's own SGD; None = the run's optimizer for it too.
      backbone_momentum: momentum of that SGD (0 = plain SGD).
    """

    name = "mist"
    inner: Method = dataclasses.field(default_factory=SeqLoRA)
    sites: tuple = LLAMA_PROJECTIONS
    fraction: float = 0.05
    keep_prob: float = 0.1
    decay: float = 0.9
    temperature: float = 0.07
    token_drop: float = 0.1
    head_dim: int = 128
    batch_size: int = 16
    sensitivity_examples: int = 0
    backbone_lr: Optional[float] = 1e-4
    backbone_momentum: float = 0.9

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

    @staticmethod
    def wrap(inner: Method, **options) -> "MIST":
        """MIST around ``inner``; the result routes (``Method.route``) exactly when ``inner`` does."""
        routes = type(inner).route is not Method.route
        return (RoutingMIST if routes else MIST)(inner=inner, **options)

    @property
    def joint(self) -> bool:
        return self.inner.joint

    # -- state plumbing: the inner method never sees fixed["mist"] -----------------------------------
    @staticmethod
    def _inner(state) -> dict:
        return {"train": state["train"], "fixed": {k: v for k, v in state["fixed"].items() if k != "mist"}}

    @staticmethod
    def _outer(inner_state, state) -> dict:
        if "mist" in inner_state["fixed"]:
            raise ValueError("mist: the inner method uses the fixed-state key 'mist', which MIST reserves")
        return {"train": inner_state["train"], "fixed": dict(inner_state["fixed"], mist=state["fixed"]["mist"])}

    @staticmethod
    def _paths(state) -> tuple:
        """``((site, base path), ...)`` of the tuned sites (resolved by ``init``)."""
        return tuple((site, site_path(site)) for site in state["fixed"]["mist"]["selected"])

    # -- protocol --------------------------------------------------------------------------------
    def init(self, key, site_shapes, num_tasks):
        try:
            sites = select_sites(site_shapes, self.sites)
        except ValueError as e:
            raise ValueError(f"mist: {e}") from None
        state = self.inner.init(key, site_shapes, num_tasks)
        dtype = _bits_dtype(num_tasks)
        mist = {"selected": {site: jnp.zeros(site_shapes[site], dtype) for site in sites},
                "task": jnp.zeros((), jnp.int32),
                "overlap": jnp.zeros((num_tasks, num_tasks), jnp.float32)}
        return self._outer(state, {"fixed": {"mist": mist}})

    def begin_task(self, key, state, task: TaskInfo, site_shapes):
        key_inner, key_mi = jax.random.split(key)
        state = self._outer(self.inner.begin_task(key_inner, self._inner(state), task, site_shapes), state)
        if task.model is None or task.batches is None:
            raise ValueError("mist.begin_task needs TaskInfo.model and TaskInfo.batches to score sensitivity")
        masks = layer_masks(self.sensitivity(key_mi, task, state), self.fraction)
        mist = state["fixed"]["mist"]
        t = jnp.int32(task.index)
        selected = {site: mist["selected"][site] | jnp.left_shift(m.astype(mist["selected"][site].dtype),
                                                                   t.astype(mist["selected"][site].dtype))
                    for site, m in masks.items()}
        chosen = sum(jnp.sum(m, dtype=jnp.float32) for m in masks.values())
        row = jnp.stack([sum(jnp.sum(m & current_mask(selected[site], jnp.int32(s)), dtype=jnp.float32)
                             for site, m in masks.items()) / chosen
                         for s in range(mist["overlap"].shape[0])])
        mist = {"selected": selected, "task": t, "overlap": mist["overlap"].at[task.index].set(row),
                "index": {site: mask_index(m) for site, m in masks.items()}}
        return {"train": state["train"], "fixed": dict(state["fixed"], mist=mist)}

    def sensitivity(self, key: jax.Array, task: TaskInfo, state) -> dict:
        """``{site: (L, d_in, d_out)}`` empirical-Fisher scores of the MI objective on ``task``'s data.

        Reads ``task.model`` and ``task.batches``; no weight is updated.
        """
        graphdef, params = nnx.split(task.model)
        base = nnx.to_pure_dict(params)
        paths = self._paths(state)
        weights = self._site_weights(base, state)
        batches = self._scoring_batches(task)
        if not batches:
            raise ValueError(f"mist: task {task.name!r} has no training batch to score sensitivity on")
        key_views, key_head = jax.random.split(key)
        total = None
        for i, batch in enumerate(batches):
            sq, _ = squared_grads(weights, base, batch, jax.random.fold_in(key_views, i), key_head, graphdef=graphdef,
                                  paths=paths, temperature=self.temperature, token_drop=self.token_drop,
                                  head_dim=self.head_dim)
            total = sq if total is None else jax.tree.map(jnp.add, total, sq)
        return sensitivity.fisher_scores(total, len(batches))

    def _site_weights(self, base: dict, state) -> dict:
        """``{site: stacked weight}`` from the model's parameters, after checking that the weights
        ``base_trainable`` lets train are exactly the tuned sites' weights (all of them masked)."""
        paths = self._paths(state)
        weights = {}
        for site, path in paths:
            try:
                weights[site] = _get(base, path)
            except (KeyError, TypeError):
                raise ValueError(f"mist: site {site!r} has no base weight at {path!r} in this model") from None
            if not self._tuned(path):
                raise ValueError(f"mist: site {site!r} matches {list(self.sites)} but its weight {path!r} does not")
            if weights[site].shape != state["fixed"]["mist"]["selected"][site].shape:
                raise ValueError(f"mist: the weight at {path!r} has shape {weights[site].shape}, not site {site!r}'s")
        # Every weight base_trainable lets the optimizer touch must have a mask.
        all_paths = ("/".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(base)[0])
        unmasked = sorted(p for p in all_paths if self._tuned(p) and p not in {q for _, q in paths})
        if unmasked:
            raise ValueError(f"mist: sites {list(self.sites)} make the base weights {unmasked} trainable, but they "
                             "are not the weights of the sites the model names; list the sites in full")
        return weights

    def _scoring_batches(self, task: TaskInfo) -> list:
        """The task's real training rows (up to ``sensitivity_examples``) in InfoNCE batches of
        ``batch_size`` rows, all of one shape so that scoring compiles once: every array is padded on
        the right to the longest row (padding is masked out) and the last batch is filled up with
        repeats of its own rows (a repeated example counts twice, as an extra positive pair)."""
        rows = []
        for batch in task.batches():
            real = np.asarray(batch["real"], bool)
            rows.append({k: np.asarray(v)[real] for k, v in batch.items() if k not in ("real", "task_ids")})
            if self.sensitivity_examples and sum(len(r["input_ids"]) for r in rows) >= self.sensitivity_examples:
                break
        if not rows:
            return []
        width = {k: max(r[k].shape[1] for r in rows) for k in rows[0]}
        rows = {k: np.concatenate([np.pad(r[k], [(0, 0), (0, width[k] - r[k].shape[1])]) for r in rows])
                for k in rows[0]}
        count = len(rows["input_ids"])
        if self.sensitivity_examples:
            count = min(count, self.sensitivity_examples)
        batches = []
        for start in range(0, count, self.batch_size):
            index = start + np.arange(self.batch_size) % min(self.batch_size, count - start)
            batches.append({k: jnp.asarray(v[index]) for k, v in rows.items()})
        return batches

    def base_trainable(self, path):
        return self._tuned(path) or self.inner.base_trainable(path)

    def _tuned(self, path: str) -> bool:
        return any(path_matches(path, pattern) for pattern in self.sites)

    def adapter(self, state, ctx, key=None):
        return self.inner.adapter(self._inner(state), ctx, key)

    def train_ctx(self, model, state, batch):
        return self.inner.train_ctx(model, self._inner(state), batch)

    def eval_ctx(self, model, state, batch, task):
        return self.inner.eval_ctx(model, self._inner(state), batch, task)

    def extra_loss(self, state, base):
        return self.inner.extra_loss(self._inner(state), base)

    def optimizer(self, tx):
        inner = self.inner.optimizer(tx)
        if self.backbone_lr is None:
            return inner
        backbone = optax.sgd(self.backbone_lr, momentum=self.backbone_momentum or None)
        return optax.multi_transform({"method": inner, "base": backbone}, lambda params: {k: k for k in params})

    def transform_grads(self, grads, state, key):
        key_inner, key_drop = jax.random.split(key)
        grads = self.inner.transform_grads(grads, self._inner(state), key_inner)
        mist = state["fixed"]["mist"]
        paths = self._paths(state)
        # Work on the masked entries only (gathered by their flat index per layer): drawing the drop
        # decisions for k of the entries instead of all of them is what keeps the step cheap.
        picked, scale = {}, {}
        for site, path in paths:
            index = mist["index"][site]
            flat = _get(grads["base"], path).reshape(index.shape[0], -1)
            picked[site] = jnp.take_along_axis(flat, index, axis=1)
            bits = jnp.take_along_axis(mist["selected"][site].reshape(index.shape[0], -1), index, axis=1)
            scale[site] = jnp.power(jnp.float32(self.decay), earlier_count(bits, mist["task"]))
        kept = sensitivity.drop_gradients(key_drop, picked, {site: True for site in picked}, self.keep_prob)
        base = grads["base"]
        for site, path in paths:
            grad, index = _get(base, path), mist["index"][site]
            rows = jnp.arange(index.shape[0])[:, None]
            values = (kept[site] * scale[site]).astype(grad.dtype)
            dense = jnp.zeros((index.shape[0], grad[0].size), grad.dtype).at[rows, index].set(values)
            base = _replace(base, path, dense.reshape(grad.shape))
        return dict(grads, base=base)

    def post_update(self, state):
        return self._outer(self.inner.post_update(self._inner(state)), state)

    def end_task(self, state, task):
        return self._outer(self.inner.end_task(self._inner(state), task), state)

    def report(self, state):
        mist = state["fixed"]["mist"]
        t = int(mist["task"])
        sizes = {site: int(np.prod(s.shape)) for site, s in mist["selected"].items()}
        per_task = []
        for s in range(t + 1):
            chosen = sum(int(jnp.sum(current_mask(sel, jnp.int32(s)))) for sel in mist["selected"].values())
            per_task.append(chosen / sum(sizes.values()))
        overlap = np.asarray(mist["overlap"])[: t + 1, : t + 1]
        return dict(self.inner.report(self._inner(state)), mist={
            "sites": list(mist["selected"]), "fraction": self.fraction, "keep_prob": self.keep_prob, "decay": self.decay,
            "tuned_weights": sum(sizes.values()),
            "mask_share_per_task": per_task,
            # row t, column s <= t: share of task t's mask that task s also chose
            "mask_overlap": np.round(np.tril(overlap), 6).tolist(),
            "expected_share_changed_per_step_plain_sgd": self.fraction * self.keep_prob})


@dataclasses.dataclass(frozen=True)
class RoutingMIST(MIST):
    """MIST around a routing method (the engine reports routing accuracy for it)."""

    def route(self, model, state, batch):
        return self.inner.route(model, self._inner(state), batch)
