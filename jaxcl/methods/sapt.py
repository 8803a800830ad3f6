"""SAPT: shared attentive learning & selection (SALS) with attentive reflection (ARM).

Math: docs/sapt.md.

**SALS.** One LoRA per task at the q and v projections of every attention block (a ``LoRABank``:
past LoRAs frozen in task slots, the current one trained). The input of an example is summarised by
``e`` = max-pool over its input tokens of the model's input token embeddings (``embed_inputs``); a
query network (``kernels.attention_select``: ``q = LayerNorm(SiLU(e W_down W_up))``, d → 100 → d) and
one key per task give the attention ``a = softmax(K q / sqrt(d))`` over the tasks seen so far (the
current one included; tasks not trained yet are masked to exactly 0), and every site adds
``Σ_i a_i LoRA_i(x)``. The attention travels as the per-example context (the bank's weights), so a
T5 decoder uses the attention computed from its encoder's input, and generation keeps it for every
new token.

Column convention (``LoRABank``): columns ``0..T-1`` weight the past slots, column ``T`` the current
LoRA. While task ``c`` trains, its attention ``a_c`` goes to column ``T`` (its slot ``c`` is still
zero); after ``end_task`` its LoRA lives in slot ``c`` and evaluation uses columns ``0..T-1`` only.

Trainable: the current LoRA, the query network (shared by all tasks, trained continually) and the
current task's key. All keys are preallocated in the fixed state (``U(-1, 1)`` at init); at
``begin_task(c)`` key ``c`` is copied into the params, the attention uses it in row ``c``, and at
``end_task`` it is written back. Past keys and past LoRAs never receive gradients.

**ARM.** After task ``t`` the fixed state keeps ``targets[t]`` = the mean attention over task
``t``'s held-out inputs (``TaskInfo.validation_batches``, the validation split carved from its
training data; the training inputs when that split is empty), over tasks ``<= t``, zeros after.
While task ``c`` trains, ``extra_loss`` adds ``kl_ratio · Σ_{i<c} KL(target_i ‖ softmax(scores))``
over pseudo-inputs of each past task ``i``; only the query network and the keys enter it.

**Routing the current task** (``current_ratio``, jaxcl's addition, on by default; 0 is the paper's
method). SAPT's query network learns to send the current task's inputs to the current key only
through the cross-entropy, whose pull on the attention is proportional to how much the current LoRA
already helps: nothing at the start of a task (its B matrix is zero). ARM meanwhile pushes the past
tasks' pseudo-inputs, whose pooled embeddings are close to every other prompt's (cosine 0.97-0.98
between task centroids on SmolLM2), towards the past keys from the first step. On real text with a
few hundred steps per task the push wins and every prompt is routed to the first task (measured on
the H200: 100/0/0/0 on the bundled stream, 100/0/0 on O-LoRA's standard order 1;
``experiments/sapt_routing/``). ``current_ratio > 0`` adds
``current_ratio · KL(onehot(c) ‖ softmax(scores))`` on the current task's own training inputs, so
the attention is trained as a classifier of "this task" against ARM's "earlier tasks". The current
task's identity comes from the step context (replayed rows of earlier tasks are left out).

**Fitting the routing first** (``route_epochs``, jaxcl's addition, 3 by default; 0 is the paper's
method). With the two routing terms alone the query network is still half-trained when a task of a
few hundred steps at a small learning rate ends: the mean attention stored as ARM's target is soft
(0.59 on its own task for amazon in O-LoRA's order 1), and a held-out prompt of the middle task sits
on the boundary, so the next task takes it (after the last task: 100 / 0 / 100 % on the GPU with
``kl_ratio`` 0.5; 100 / 15 / 100 % even with the cross-entropy's gradient kept out of the attention).
The query network's input, the pooled frozen embedding, does not depend on any LoRA, so the routing
can be fitted on its own before the task's LoRA trains: at ``begin_task(c)`` (``c > 0``) the task's
training inputs are pooled once and the query network and key ``c`` take ``route_epochs`` passes of
Adam (``route_lr``, batches of ``route_batch``) on ``current_ratio`` · the current task's routing KL
+ ``route_kl_ratio`` · ARM's KL (1: each past task weighs as much as the current one). The LoRA
then trains under an attention that already routes its task, and training goes on as above. On
O-LoRA's order 1 this routes 100 / 96.7 / 100 % with the paper's ``kl_ratio`` 0.1
(``experiments/sapt/RESULTS.md``).

Pseudo-inputs (``pseudo_fraction`` of the task's training examples, as the paper's ~2%, between
``pseudo_min`` and ``pseudo_capacity``) are made at ``end_task``:
  * ``pseudo_source="real"`` (default): stored real prompts of the task, evenly spaced over its
    training data. Only their pooled embeddings are kept, never their answers; still, results of
    this mode are a memory of real inputs, which the paper does not keep.
  * ``pseudo_source="generated"`` (the paper's generative replay, with the base model as the
    generator): the base language model (``TaskInfo.model``, no adapter) continues the task's
    instruction header (the longest token prefix that all of its prompts share) by temperature
    sampling for ``pseudo_new_tokens`` tokens (up to an EOS); for T5 the header is the encoder
    input and the decoder's sample is appended to it. SAPT trains a generator per task; jaxcl uses
    the base model, and with SmolLM2-135M its samples do not resemble the task's prompts, so ARM
    rehearses the wrong inputs (measured in ``experiments/sapt_routing/``).
Since the embedding table is frozen, the pooled embedding of a fixed input never changes, so each
pseudo-input is kept as its pooled embedding ``pseudo`` (T, capacity, d) with a validity mask
``pseudo_valid`` (T, capacity): the reflection loss costs one query-network pass per step.

**Pooling.** By default only the input tokens are pooled: the prompt (decoder-only training batches
hold prompt + answer; the answer is never pooled) and never padding. ``pool_padding=True``
reproduces SAPT's code, which max-pools the padded batch: every non-answer position.

SAPT's official code selects checkpoints on the test set (dev == test); jaxcl never does.

References:
  Zhao et al., SAPT: A Shared Attentive Learning and Selection Framework for Parameter-Efficient
  Continual Learning of Large Language Models, ACL 2024. https://arxiv.org/abs/2401.08295
  (official code: github.com/circle-hit/SAPT).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional, final

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxcl.kernels import attention_select
from jaxcl.methods.axes import logical
from jaxcl.methods.base import Method, MethodState, TaskInfo
from jaxcl.methods.lora_bank import Current, LoRABank, LoRAOptions, begin_incremental, finish_incremental

T5_SITES = tuple(f"{block}.{proj}" for block in ("encoder.self_attn", "decoder.self_attn", "decoder.cross_attn")
                 for proj in ("q", "v"))
PSEUDO_SOURCES = ("generated", "real")
_PREFIX_BUCKET = 16  # the sampler compiles once per bucket of header lengths, not per length
_QUERY_INPUTS = ("input_ids", "attention_mask", "loss_mask", "decoder_input_ids")  # what input_mask reads


class SAPTParams(NamedTuple):
    lora: dict                                # {site: LoRA}, the current task's
    query: attention_select.QueryParams       # the shared query network
    key: jax.Array                            # (d,) the current task's key


class SAPTFixed(NamedTuple):
    past: dict            # {site: LoRA} past bank
    keys: jax.Array       # (T, d)
    seen: jax.Array       # (T,) bool: tasks trained so far
    targets: jax.Array    # (T, T) ARM targets, row t after task t
    pseudo: jax.Array     # (T, capacity, d) pooled embeddings of pseudo-inputs
    pseudo_valid: jax.Array  # (T, capacity)
    seed: jax.Array       # () int32 of the current task's pseudo-input sampler


# -- pure pieces --------------------------------------------------------------------------------
def pool_embeddings(emb: jax.Array, mask: jax.Array) -> jax.Array:
    """Max-pool over the tokens of ``mask`` of their input embeddings.

    Args:
      emb: ``(B, S, d)`` input embeddings.
      mask: ``(B, S)``, nonzero on the tokens to pool.

    Returns:
      ``(B, d)`` float32; a row without any token is 0.

    Examples:
      >>> emb = jnp.array([[[1.0, -1.0], [3.0, -5.0], [9.0, 9.0]]])
      >>> pool_embeddings(emb, jnp.array([[1, 1, 0]])).tolist()
      [[3.0, -1.0]]
    """
    emb = emb.astype(jnp.float32)
    keep = mask.astype(bool)[..., None]
    pooled = jnp.max(jnp.where(keep, emb, -jnp.inf), axis=1)
    return jnp.where(jnp.any(keep, axis=1), pooled, 0.0)


def input_mask(batch: dict, pool_padding: bool = False) -> jax.Array:
    """``(B, S)`` the positions of ``batch["input_ids"]`` whose embeddings make the query.

    Decoder-only training batches (``input_ids`` = prompt + answer, with ``loss_mask`` on the answer)
    pool the prompt; evaluation batches and encoder inputs pool every token. With ``pool_padding``
    padding positions are pooled too (never answer tokens).
    """
    ids = batch["input_ids"]
    tokens = jnp.ones(ids.shape, bool) if pool_padding else batch["attention_mask"].astype(bool)
    if "loss_mask" in batch and "decoder_input_ids" not in batch:
        tokens = tokens & (batch["loss_mask"] == 0)
    return tokens


def common_prefix(sequences: list) -> np.ndarray:
    """The longest token prefix shared by every sequence (1-D integer arrays).

    Examples:
      >>> common_prefix([np.array([1, 2, 3]), np.array([1, 2, 5, 6])]).tolist()
      [1, 2]
    """
    prefix = np.asarray(sequences[0])
    for seq in sequences[1:]:
        n = min(len(prefix), len(seq))
        differ = np.flatnonzero(prefix[:n] != np.asarray(seq[:n]))
        prefix = prefix[: differ[0] if differ.size else n]
    return prefix


@functools.partial(jax.jit, static_argnames=("graphdef", "new_tokens", "temperature"))
def sample_continuations(graphdef, weights, prefix_ids, prefix_mask, key, *, new_tokens: int,
                         temperature: float) -> jax.Array:
    """Temperature-sampled continuations of prompt prefixes by a plain (adapter-free) model.

    No KV cache: each new token reruns the model over the whole buffer (a few calls per task).

    Args:
      graphdef, weights: ``nnx.split(model)`` of a Llama or T5.
      prefix_ids: ``(n, P)`` prefixes, left-padded (decoder-only) or right-padded (T5 encoder input).
      prefix_mask: ``(n, P)`` 1 on tokens.
      key: PRNG key.
      new_tokens: tokens to sample per row.
      temperature: softmax temperature (> 0).

    Returns:
      ``(n, new_tokens)`` int32 sampled ids (decoder-only: continuing the prefix; T5: the decoder's
      output given the prefix as encoder input).
    """
    model = nnx.merge(graphdef, weights)
    n, p = prefix_ids.shape
    keys = jax.random.split(key, new_tokens)

    def sample(i, logits):
        return jax.random.categorical(keys[i], logits / temperature, axis=-1).astype(jnp.int32)

    if model.is_encoder_decoder:
        encoded = model.encode(prefix_ids, prefix_mask)
        start = jnp.full((n, new_tokens + 1), model.config.decoder_start_token_id, jnp.int32)

        def t5_step(i, dec):
            h = jax.lax.dynamic_index_in_dim(model.decode_hidden(dec, encoded, prefix_mask), i, 1, keepdims=False)
            return dec.at[:, i + 1].set(sample(i, model.logits(h)))

        return jax.lax.fori_loop(0, new_tokens, t5_step, start)[:, 1:]

    buffer = jnp.concatenate([prefix_ids.astype(jnp.int32), jnp.zeros((n, new_tokens), jnp.int32)], axis=1)
    mask = jnp.concatenate([prefix_mask, jnp.ones((n, new_tokens), prefix_mask.dtype)], axis=1)

    def llama_step(i, buf):
        # Causal attention: slot p + i - 1 never sees the unfilled slots after it.
        h = jax.lax.dynamic_index_in_dim(model.hidden(buf, mask), p + i - 1, 1, keepdims=False)
        return buf.at[:, p + i].set(sample(i, model.logits(h)))

    return jax.lax.fori_loop(0, new_tokens, llama_step, buffer)[:, p:]


def _eos_ids(model) -> tuple[int, ...]:
    eos = model.config.eos_token_id
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else (eos,)))


def _pad_rows(rows: list, length: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for b, row in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        ids[b, span], mask[b, span] = row, 1
    return ids, mask


# -- the method ---------------------------------------------------------------------------------
@final
@dataclasses.dataclass(frozen=True)
class SAPT(LoRAOptions, Method):
    """SALS + ARM (module docstring). Defaults: the official Long-sequence T5 settings (r=8, α=32,
    dropout 0, kl_ratio 0.1; lr 3e-4 in the run config); SuperNI uses r=4, kl_ratio 0.5.

    Attributes:
      sites: q and v of every attention block (Llama default; T5: ``T5_SITES``).
      bottleneck: hidden width of the query network.
      kl_ratio: weight of the attentive-reflection KL (0 disables ARM).
      current_ratio: weight of the current task's routing KL (0: the paper's method; module docstring).
      pool_padding: max-pool over padding too (SAPT's code) instead of input tokens only.
      pseudo_source: ``"real"`` (stored prompts) or ``"generated"`` (the base model continues the
        task header: the paper's generative replay).
      pseudo_fraction, pseudo_min, pseudo_capacity: pseudo-inputs per task =
        clip(round(fraction · train size), min, capacity); capacity is preallocated for every task.
      pseudo_new_tokens: sampled tokens per generated pseudo-input.
      pseudo_temperature: sampling temperature of the generator.
      route_epochs: passes of the routing losses over the task's pooled inputs before its LoRA trains
        (0: the paper's method; module docstring, "Fitting the routing first").
      route_batch, route_lr: batch size and Adam learning rate of those passes.
      route_kl_ratio: ARM's weight in those passes (the current task's routing term keeps
        ``current_ratio``): 1 weighs every past task as much as the current one; none while
        ``kl_ratio`` is 0.
    """

    name = "sapt"
    routes = True
    dropout: float = 0.0
    bottleneck: int = 100
    kl_ratio: float = 0.1
    current_ratio: float = 1.0
    pool_padding: bool = False
    pseudo_source: str = "real"
    pseudo_fraction: float = 0.02
    pseudo_min: int = 4
    pseudo_capacity: int = 32
    pseudo_new_tokens: int = 32
    pseudo_temperature: float = 1.0
    route_epochs: int = 3
    route_batch: int = 16
    route_lr: float = 1e-3
    route_kl_ratio: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.pseudo_source not in PSEUDO_SOURCES:
            raise ValueError(f"pseudo_source: expected one of {PSEUDO_SOURCES}, got {self.pseudo_source!r}")
        if not 1 <= self.pseudo_min <= self.pseudo_capacity:
            raise ValueError(f"need 1 <= pseudo_min <= pseudo_capacity, got {self.pseudo_min}, {self.pseudo_capacity}")
        if self.pseudo_temperature <= 0 or self.pseudo_new_tokens < 1 or self.kl_ratio < 0 or self.current_ratio < 0:
            raise ValueError("pseudo_temperature must be > 0, pseudo_new_tokens >= 1, kl_ratio and current_ratio >= 0")
        if self.route_epochs < 0 or self.route_batch < 1 or self.route_lr <= 0 or self.route_kl_ratio < 0:
            raise ValueError(f"sapt: need route_epochs >= 0, route_batch >= 1, route_lr > 0, route_kl_ratio >= 0; got "
                             f"{self.route_epochs}, {self.route_batch}, {self.route_lr}, {self.route_kl_ratio}")

    # -- state -----------------------------------------------------------------------------------
    def init(self, key, model, num_tasks):
        k_lora, k_query, k_keys = jax.random.split(key, 3)
        sites = self.bank.current(k_lora, model)
        widths = {model.site_shapes[s][1] for s in sites}
        if widths != {model.hidden_size}:
            raise ValueError(f"sapt: the sites {sorted(sites)} must all read the model width {model.hidden_size}; "
                             f"their input widths are {sorted(widths)}")
        d = model.hidden_size
        keys = jax.vmap(lambda k: attention_select.task_key_init(k, d))(jax.random.split(k_keys, num_tasks))
        q = attention_select.query_init(k_query, d, self.bottleneck)
        query = attention_select.QueryParams(logical(q.w_down, ("embed", "bottleneck")),
                                             logical(q.w_up, ("bottleneck", "embed")),
                                             logical(q.ln_scale, ("embed",)), logical(q.ln_bias, ("embed",)))
        params = SAPTParams(sites, query, logical(keys[0], ("embed",)))
        fixed = SAPTFixed(self.bank.past(model, num_tasks), logical(keys, ("tasks", "embed")),
                          logical(jnp.zeros((num_tasks,), bool), ("tasks",)),
                          logical(jnp.zeros((num_tasks, num_tasks)), ("tasks", None)),
                          logical(jnp.zeros((num_tasks, self.pseudo_capacity, d)), ("tasks", None, "embed")),
                          logical(jnp.zeros((num_tasks, self.pseudo_capacity)), ("tasks", None)),
                          logical(jnp.zeros((), jnp.int32), ()))
        return MethodState(params, fixed)

    def begin_task(self, key, state, task: TaskInfo):
        k_lora, k_seed = jax.random.split(key)
        lora = begin_incremental(self.bank, k_lora, task.index, state.params.lora)
        fixed = state.fixed._replace(seed=jax.random.randint(k_seed, (), 0, np.iinfo(np.int32).max, jnp.int32))
        return self._fit_routing(MethodState(state.params._replace(lora=lora, key=fixed.keys[task.index]), fixed), task)

    def end_task(self, state, task: TaskInfo):
        c = task.index
        if task.batches is None or task.model is None:
            raise ValueError("sapt needs TaskInfo.batches and TaskInfo.model (ARM stores each task's mean attention)")
        past, lora = finish_incremental(state.fixed.past, state.params.lora, c)
        fixed = state.fixed._replace(past=past, keys=state.fixed.keys.at[c].set(state.params.key),
                                     seen=state.fixed.seen.at[c].set(True))
        state = MethodState(state.params._replace(lora=lora), fixed)
        held_out = None if task.validation_batches is None else task.validation_batches()
        mean_attention = self._mean_attention(task.model, state, held_out)
        if mean_attention is None:  # no validation split: the training inputs
            mean_attention = self._mean_attention(task.model, state, task.batches())
        fixed = fixed._replace(targets=fixed.targets.at[c].set(mean_attention))
        if c + 1 < task.num_tasks:  # no later task reflects on the last one: it needs no pseudo-inputs
            pooled = self._pseudo_inputs(state, task, self._prompts(task.batches()))
            n = pooled.shape[0]
            valid = (jnp.arange(self.pseudo_capacity) < n).astype(jnp.float32)
            fixed = fixed._replace(pseudo=fixed.pseudo.at[c, :n].set(pooled), pseudo_valid=fixed.pseudo_valid.at[c].set(valid))
        return MethodState(state.params, fixed)

    # -- attention -------------------------------------------------------------------------------
    def _scores(self, state, e: jax.Array, current: Optional[jax.Array]) -> jax.Array:
        """``(B, T)`` attention logits of pooled inputs ``e`` (B, d); tasks not trained yet are -inf.

        ``current``: the task being trained (its key is the params' one, and it is active), or None
        at evaluation (the seen tasks, with their stored keys).
        """
        fixed = state.fixed
        q = attention_select.query(state.params.query, e)
        if current is None:
            return attention_select.attention_logits(fixed.keys, q, fixed.seen)
        rows = jnp.arange(fixed.keys.shape[0])
        keys = jnp.where((rows == current)[:, None], state.params.key[None], fixed.keys)
        return attention_select.attention_logits(keys, q, rows <= current)

    def _pooled(self, model, batch: dict) -> jax.Array:
        return pool_embeddings(model.embed_inputs(batch["input_ids"]), input_mask(batch, self.pool_padding))

    def attention(self, model, state, batch: dict, current: Optional[jax.Array] = None) -> jax.Array:
        """``(B, T)`` attention of each example over the task slots (0 for tasks not trained yet)."""
        return jax.nn.softmax(self._scores(state, self._pooled(model, batch), current), axis=-1)

    def train_ctx(self, model, state, batch, step):
        a = self.attention(model, state, batch, step.task)
        current = jnp.arange(a.shape[1]) == step.task
        # The current task's weight moves from its (still empty) slot to the current-LoRA column.
        past = jnp.where(current, 0.0, a)
        now = jnp.sum(jnp.where(current, a, 0.0), axis=1, keepdims=True)
        return jnp.concatenate([past, now], axis=1)

    def eval_ctx(self, model, state, batch):
        a = self.attention(model, state, batch)  # the attention decides, never the task id
        return jnp.concatenate([a, jnp.zeros_like(a[:, :1])], axis=1)

    def route(self, model, state, batch):
        return jnp.argmax(self.attention(model, state, batch), axis=1).astype(jnp.int32)

    def adapter(self, state, ctx, key=None):
        return self.bank.adapter(state.params.lora, state.fixed.past, ctx, key)

    # -- attentive reflection (and the current task's routing) -----------------------------------
    def extra_loss(self, model, state, batch, step):
        pooled = rows = None  # the reflection alone reads no batch
        if self.current_ratio:
            rows = ((batch["task_ids"] == step.task) & (jnp.sum(batch["loss_mask"], axis=1) > 0)).astype(jnp.float32)
            pooled = self._pooled(model, batch)
        return self._routing_loss(state, pooled, rows, step.task)

    def _routing_loss(self, state, pooled: Optional[jax.Array], rows: Optional[jax.Array], current: jax.Array) -> jax.Array:
        """ARM's KL over the past tasks' pseudo-inputs plus the current task's routing KL over ``pooled``
        ``(B, d)``, the current task's rows weighted by ``rows`` ``(B,)``."""
        loss = jnp.zeros((), jnp.float32)
        if self.kl_ratio:
            fixed = state.fixed
            num_tasks, capacity, d = fixed.pseudo.shape
            scores = self._scores(state, fixed.pseudo.reshape(-1, d), current)
            targets = jnp.repeat(fixed.targets, capacity, axis=0)
            per_input = jax.vmap(lambda s, t: attention_select.kl_to_target(s[None], t))(scores, targets)
            weights = fixed.pseudo_valid * (jnp.arange(num_tasks) < current).astype(jnp.float32)[:, None]
            per_task = jnp.sum(per_input.reshape(num_tasks, capacity) * weights, axis=1)
            loss = loss + self.kl_ratio * jnp.sum(per_task / jnp.maximum(jnp.sum(weights, axis=1), 1.0))
        if self.current_ratio:
            scores = self._scores(state, pooled, current)
            own = jax.nn.one_hot(current, scores.shape[1])
            per_input = jax.vmap(lambda s: attention_select.kl_to_target(s[None], own))(scores)
            loss = loss + self.current_ratio * jnp.sum(per_input * rows) / jnp.maximum(jnp.sum(rows), 1.0)
        return loss

    def _fit_routing(self, state, task: TaskInfo):
        """``route_epochs`` passes of the routing losses over the task's pooled training inputs, before
        its LoRA trains (module docstring, "Fitting the routing first")."""
        if not self.route_epochs or task.index == 0 or task.batches is None or task.model is None:
            return state  # task 0 alone: one active key, nothing to separate
        pooled = jnp.concatenate([_pool(self, task.model, {k: jnp.asarray(v) for k, v in b.items() if k in _QUERY_INPUTS})
                                  [np.asarray(b["real"], bool)] for b in task.batches()])
        count = pooled.shape[0]
        size = max(64, 1 << (count - 1).bit_length())  # a few padded sizes: the fit compiles once per size
        padded = jnp.zeros((size, pooled.shape[1]), jnp.float32).at[:count].set(pooled)
        steps = self.route_epochs * -(-count // self.route_batch)
        query, key = _fit_route(self, state, padded, count, steps, task.index,
                                jax.random.fold_in(jax.random.PRNGKey(state.fixed.seed), task.index))
        return MethodState(state.params._replace(query=query, key=key), state.fixed)

    # -- end-of-task statistics ------------------------------------------------------------------
    def _mean_attention(self, model, state, batches) -> Optional[jax.Array]:
        """``(T,)`` mean attention over the real rows of ``batches``; None when there are none."""
        total, count = 0.0, 0
        for batch in batches or ():
            real = np.asarray(batch["real"], bool)
            a = _attend(self, model, state, {k: jnp.asarray(v) for k, v in batch.items() if k in _QUERY_INPUTS})
            total = total + jnp.sum(jnp.where(jnp.asarray(real)[:, None], a, 0.0), axis=0)
            count += int(real.sum())
        return total / count if count else None

    def _prompts(self, batches) -> list:
        """The prompt tokens (1-D arrays) of the real rows of ``batches``."""
        prompts = []
        for batch in batches:
            real = np.asarray(batch["real"], bool)
            ids, tokens = np.asarray(batch["input_ids"]), np.asarray(input_mask(batch))
            prompts += [ids[b][tokens[b]] for b in np.flatnonzero(real)]
        if not prompts:
            raise ValueError("sapt: the task has no training examples to take its prompts from")
        return prompts

    def _pseudo_inputs(self, state, task: TaskInfo, prompts: list) -> jax.Array:
        """``(n, d)`` pooled embeddings of the task's pseudo-inputs (module docstring)."""
        model = task.model
        n = int(np.clip(round(self.pseudo_fraction * len(prompts)), self.pseudo_min, self.pseudo_capacity))
        if self.pseudo_source == "real":
            picked = [prompts[i] for i in np.unique(np.linspace(0, len(prompts) - 1, n).round().astype(int))]
            ids, mask = _pad_rows(picked, max(len(p) for p in picked), left=False)
            return pool_embeddings(model.embed_inputs(jnp.asarray(ids)), jnp.asarray(mask))
        header = common_prefix(prompts)
        if header.size == 0:
            raise ValueError(f"sapt: the prompts of task {task.name!r} share no common prefix for the language model "
                             "to continue; use pseudo_source: real")
        left = not model.is_encoder_decoder
        length = _PREFIX_BUCKET * math.ceil(header.size / _PREFIX_BUCKET)
        ids, mask = _pad_rows([header] * n, length, left=left)
        graphdef, weights = nnx.split(model)
        key = jax.random.fold_in(jax.random.PRNGKey(state.fixed.seed), task.index)
        sampled = sample_continuations(graphdef, weights, jnp.asarray(ids), jnp.asarray(mask), key,
                                       new_tokens=self.pseudo_new_tokens, temperature=self.pseudo_temperature)
        # A sample ends before its first end-of-sequence token.
        ended = jnp.cumsum(jnp.isin(sampled, jnp.asarray(_eos_ids(model) or (-1,), jnp.int32)), axis=1) > 0
        ids = jnp.concatenate([jnp.asarray(ids), sampled], axis=1)
        mask = jnp.concatenate([jnp.asarray(mask), (~ended).astype(jnp.int32)], axis=1)
        return pool_embeddings(model.embed_inputs(ids), mask)

    def report(self, state):
        fixed = state.fixed
        return {
            # row t: mean attention over task t's held-out inputs right after task t, over tasks <= t
            "mean_attention": np.asarray(fixed.targets, np.float64).round(6).tolist(),
            "pseudo_source": self.pseudo_source,
            "pseudo_inputs_per_task": np.asarray(fixed.pseudo_valid).sum(axis=1).astype(int).tolist(),
            "lora_params_per_task": self.bank.params_per_task(state.params.lora),
        }


@nnx.jit(static_argnums=0)
def _attend(method: SAPT, model, state, batch):
    return method.attention(model, state, batch)


@nnx.jit(static_argnums=0)
def _pool(method: SAPT, model, batch):
    return method._pooled(model, batch)


@functools.partial(jax.jit, static_argnums=0)
def _fit_route(method: SAPT, state, pooled, count, steps, current, key):
    """Adam steps (``route_lr``) of ``method._routing_loss`` on the query network and the current key,
    each on ``route_batch`` rows drawn from the first ``count`` rows of ``pooled`` (padded)."""
    tx = optax.adam(method.route_lr)
    rows = jnp.ones((method.route_batch,), jnp.float32)
    fit = dataclasses.replace(method, kl_ratio=method.route_kl_ratio if method.kl_ratio else 0.0)  # ARM off stays off

    def loss(route, e):
        query, key_c = route
        return fit._routing_loss(MethodState(state.params._replace(query=query, key=key_c), state.fixed),
                                 e, rows, current)

    def step(i, carry):
        route, opt = carry
        picked = pooled[jax.random.randint(jax.random.fold_in(key, i), (method.route_batch,), 0, count)]
        grads = jax.grad(loss)(route, picked)
        updates, opt = tx.update(grads, opt, route)
        return optax.apply_updates(route, updates), opt

    route = (state.params.query, state.params.key)
    return jax.lax.fori_loop(0, steps, step, (route, tx.init(route)))[0]
