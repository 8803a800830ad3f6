"""SAPT: shared attentive learning & selection (SALS) with attentive reflection (ARM), DESIGN §6.

**SALS.** One LoRA per task at the q and v projections of every attention block (a ``LoRABank``:
past LoRAs frozen in task slots, the current one trained). The input of an example is summarised by
``e`` = max-pool over its input tokens of the base model's input token embeddings; a query network
(``kernels.attention_select``: ``q = LayerNorm(SiLU(e W_down W_up))``, d → 100 → d) and one key per
task give the attention ``a = softmax(K q / sqrt(d))`` over the tasks seen so far (the current one
included; tasks not trained yet are masked to exactly 0), and every site adds ``Σ_i a_i LoRA_i(x)``.
The attention travels as the per-example context (``ctx["task_weights"]``), so a T5 decoder uses the
attention computed from its encoder's input, and generation keeps it for every new token.

Column convention (``LoRABank``): columns ``0..T-1`` weight the past slots, column ``T`` the current
LoRA. While task ``c`` trains, its attention ``a_c`` goes to column ``T`` (its slot ``c`` is still
zero); after ``end_task`` its LoRA lives in slot ``c`` and evaluation uses columns ``0..T-1`` only.

Trainable (``state["train"]``): the current LoRA, the query network (shared by all tasks, trained
continually) and the current task's key. The keys of all tasks are preallocated in
``fixed["keys"]`` (``U(-1, 1)`` at init); at ``begin_task(c)`` key ``c`` is copied into the train
state and the attention uses it in row ``c``; at ``end_task`` it is written back. Past keys and past
LoRAs are therefore in the fixed state and never receive gradients (no ``transform_grads`` needed).

**ARM.** After task ``t``, ``fixed["targets"][t]`` = the mean attention over task ``t``'s held-out
inputs (``TaskInfo.validation_batches``, the validation split carved from its training data; the
training inputs when that split is empty), over tasks ``<= t``, zeros after. While
task ``c`` trains, ``extra_loss`` adds ``kl_ratio · Σ_{i<c} KL(target_i ‖ softmax(scores))`` over
pseudo-inputs of each past task ``i``; only the query network and the keys enter it (the LoRAs are
not involved), so its gradient reaches nothing else.

Pseudo-inputs (``pseudo_fraction`` of the task's training examples, between ``pseudo_min`` and
``pseudo_capacity``) are made at ``end_task``:
  * ``pseudo_source="generated"`` (default; generative replay): the base language model
    (``TaskInfo.model``, no adapter) continues the task's instruction header — the longest token
    prefix that all of the task's prompts share, e.g. ``"Task:...\\nDataset:...\\n<instruction>"`` —
    by temperature sampling for ``pseudo_new_tokens`` tokens (up to an EOS). For T5 the header is
    the encoder input and the decoder's sample is appended to it. SAPT itself trains a separate
    generator per task; jaxcl uses the base model as is.
  * ``pseudo_source="real"``: stored real prompts of the task (evenly spaced over its training
    data). Results of this mode must be named so (it is replay of real inputs).
Since the embedding table is frozen, the pooled embedding of a fixed input never changes, so each
pseudo-input is kept as its pooled embedding ``fixed["pseudo"]`` (T, capacity, d) with a validity
mask ``fixed["pseudo_valid"]`` (T, capacity): the reflection loss then costs one query-network pass
per step, not an embedding gather over (T, capacity, length) tokens.

The query reads the input embedding table of the model of the forward pass (Llama ``embed``, T5
``shared``; ``train_ctx``/``eval_ctx`` receive the model), so the method keeps no copy of it.

**Pooling.** By default only the input tokens are pooled: the prompt (decoder-only training batches
hold prompt + answer; the answer is never pooled, so training and test queries see the same thing)
and never padding. ``pool_padding=True`` reproduces SAPT's code, which max-pools the padded batch:
every non-answer position, padding included.

SAPT's official code selects checkpoints on the test set (dev == test); jaxcl never does.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcl.kernels import attention_select
from jaxcl.methods.base import TaskInfo
from jaxcl.methods.lora_bank import LoRABank

T5_SITES = tuple(f"{block}.{proj}" for block in ("encoder.self_attn", "decoder.self_attn", "decoder.cross_attn")
                 for proj in ("q", "v"))
PSEUDO_SOURCES = ("generated", "real")
_PREFIX_BUCKET = 16  # the sampler compiles once per bucket of header lengths, not per length
_QUERY_INPUTS = ("input_ids", "attention_mask", "loss_mask", "decoder_input_ids")  # what input_mask reads


# -- pure pieces --------------------------------------------------------------------------------
def pool_embeddings(table: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Max-pool over the tokens of ``mask`` of their input embeddings.

    Args:
      table: ``(V, d)`` input embedding table.
      ids: ``(B, S)`` token ids.
      mask: ``(B, S)``, nonzero on the tokens to pool.

    Returns:
      ``(B, d)`` float32; a row without any token is 0.
    """
    emb = jnp.take(table, ids, axis=0).astype(jnp.float32)
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
    """The longest token prefix shared by every sequence (1-D integer arrays)."""
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


def _embedding_table(model) -> jax.Array:
    """The base model's input token embeddings ``(V, d)`` (T5: ``shared``; Llama: ``embed``)."""
    return (model.shared if model.is_encoder_decoder else model.embed)[...]


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
@dataclasses.dataclass(frozen=True)
class SAPT(LoRABank):
    """SALS + ARM (module docstring). Defaults: DESIGN §6 for Long-sequence T5 (r=8, α=32, dropout 0,
    kl_ratio 0.1, lr 3e-4 in the run config); SuperNI uses r=4, kl_ratio 0.5.

    Attributes:
      sites: q and v of every attention block (Llama default; T5: ``T5_SITES``).
      bottleneck: hidden width of the query network.
      kl_ratio: weight of the attentive-reflection KL (0 disables ARM).
      pool_padding: max-pool over padding too (SAPT's code) instead of input tokens only.
      pseudo_source: ``"generated"`` (the language model continues the task header) or ``"real"``.
      pseudo_fraction, pseudo_min, pseudo_capacity: pseudo-inputs per task =
        clip(round(fraction · train size), min, capacity); capacity is preallocated for every task.
      pseudo_new_tokens: sampled tokens per generated pseudo-input.
      pseudo_temperature: sampling temperature of the generator.
    """

    name = "sapt"
    sites: tuple = ("attn.q", "attn.v")
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    bottleneck: int = 100
    kl_ratio: float = 0.1
    pool_padding: bool = False
    pseudo_source: str = "generated"
    pseudo_fraction: float = 0.02
    pseudo_min: int = 4
    pseudo_capacity: int = 32
    pseudo_new_tokens: int = 32
    pseudo_temperature: float = 1.0

    def __post_init__(self):
        if not self.new_lora_per_task:
            raise ValueError("sapt keeps one LoRA per task: new_lora_per_task must stay true")
        if self.pseudo_source not in PSEUDO_SOURCES:
            raise ValueError(f"pseudo_source: expected one of {PSEUDO_SOURCES}, got {self.pseudo_source!r}")
        if not 1 <= self.pseudo_min <= self.pseudo_capacity:
            raise ValueError(f"need 1 <= pseudo_min <= pseudo_capacity, got {self.pseudo_min}, {self.pseudo_capacity}")
        if self.pseudo_temperature <= 0 or self.pseudo_new_tokens < 1 or self.kl_ratio < 0:
            raise ValueError("pseudo_temperature must be > 0, pseudo_new_tokens >= 1 and kl_ratio >= 0")

    # -- state -----------------------------------------------------------------------------------
    def init(self, key, site_shapes, num_tasks):
        k_lora, k_query, k_keys = jax.random.split(key, 3)
        state = super().init(k_lora, site_shapes, num_tasks)
        widths = {site_shapes[s][1] for s in self.sites}
        if len(widths) != 1:
            raise ValueError(f"sapt: the sites {self.sites} must all read the model width; "
                             f"their input widths are {sorted(widths)}")
        d = widths.pop()
        keys = jax.vmap(lambda k: attention_select.task_key_init(k, d))(jax.random.split(k_keys, num_tasks))
        train = dict(state["train"], query=attention_select.query_init(k_query, d, self.bottleneck), key=keys[0])
        fixed = dict(state["fixed"], keys=keys, current=jnp.int32(0), seed=jnp.int32(0),
                     targets=jnp.zeros((num_tasks, num_tasks), jnp.float32),
                     pseudo=jnp.zeros((num_tasks, self.pseudo_capacity, d), jnp.float32),
                     pseudo_valid=jnp.zeros((num_tasks, self.pseudo_capacity), jnp.float32))
        return {"train": train, "fixed": fixed}

    def begin_task(self, key, state, task: TaskInfo, site_shapes):
        if task.model is None:
            raise ValueError("sapt needs TaskInfo.model (its input embeddings make the attention queries)")
        k_lora, k_seed = jax.random.split(key)
        fresh = super().begin_task(k_lora, state, task, site_shapes)
        fixed = dict(state["fixed"], current=jnp.int32(task.index),
                     seed=jax.random.randint(k_seed, (), 0, np.iinfo(np.int32).max, jnp.int32))
        train = dict(state["train"], lora=fresh["train"]["lora"], key=fixed["keys"][task.index])
        return {"train": train, "fixed": fixed}

    def end_task(self, state, task: TaskInfo):
        c = task.index
        keys = state["fixed"]["keys"].at[c].set(state["train"]["key"])
        stored = super().end_task(state, task)
        fixed = dict(stored["fixed"], keys=keys)
        train = dict(state["train"], lora=stored["train"]["lora"])
        state = {"train": train, "fixed": fixed}
        if task.batches is None:
            raise ValueError("sapt needs TaskInfo.batches (ARM stores each task's mean attention)")
        table = _embedding_table(task.model)
        prompts = self._prompts(task.batches())
        held_out = None if task.validation_batches is None else task.validation_batches()
        mean_attention = self._mean_attention(table, state, held_out)
        if mean_attention is None:  # no validation split: the training inputs
            mean_attention = self._mean_attention(table, state, task.batches())
        fixed = dict(fixed, targets=fixed["targets"].at[c].set(mean_attention))
        if c + 1 < task.num_tasks:  # no later task reflects on the last one: it needs no pseudo-inputs
            pooled = self._pseudo_inputs(table, state, task, prompts)
            n = pooled.shape[0]
            valid = (jnp.arange(self.pseudo_capacity) < n).astype(jnp.float32)
            fixed = dict(fixed, pseudo=fixed["pseudo"].at[c, :n].set(pooled),
                         pseudo_valid=fixed["pseudo_valid"].at[c].set(valid))
        return {"train": train, "fixed": fixed}

    # -- attention -------------------------------------------------------------------------------
    def attention(self, table: jax.Array, state, batch: dict, training: bool) -> jax.Array:
        """``(B, T)`` attention of each example over the task slots (0 for tasks not trained yet).

        ``training``: use the current key from the train state in row ``current`` (after
        ``end_task`` it lives in ``fixed["keys"]``).
        """
        fixed = state["fixed"]
        e = pool_embeddings(table, batch["input_ids"], input_mask(batch, self.pool_padding))
        q = attention_select.query(state["train"]["query"], e)
        return attention_select.select(self._keys(state, training), q, self._active(fixed))

    def _keys(self, state, training: bool) -> jax.Array:
        keys = state["fixed"]["keys"]
        if not training:
            return keys
        row = jnp.arange(keys.shape[0])[:, None] == state["fixed"]["current"]
        return jnp.where(row, state["train"]["key"][None], keys)

    @staticmethod
    def _active(fixed) -> jax.Array:
        return jnp.arange(fixed["keys"].shape[0]) <= fixed["current"]

    def train_ctx(self, model, state, batch):
        a = self.attention(_embedding_table(model), state, batch, training=True)
        current = jnp.arange(a.shape[1]) == state["fixed"]["current"]
        # The current task's weight moves from its (still empty) slot to the current-LoRA column.
        past = jnp.where(current, 0.0, a)
        now = jnp.sum(jnp.where(current, a, 0.0), axis=1, keepdims=True)
        return {"task_weights": jnp.concatenate([past, now], axis=1)}

    def eval_ctx(self, model, state, batch, task):
        del task  # the attention decides, never the task id
        a = self.attention(_embedding_table(model), state, batch, training=False)
        return {"task_weights": jnp.concatenate([a, jnp.zeros_like(a[:, :1])], axis=1)}

    def route(self, model, state, batch):
        return jnp.argmax(self.attention(_embedding_table(model), state, batch, training=False), axis=1).astype(jnp.int32)

    # -- attentive reflection --------------------------------------------------------------------
    def extra_loss(self, state, base):
        del base
        if self.kl_ratio == 0:
            return jnp.zeros((), jnp.float32)
        fixed = state["fixed"]
        num_tasks, capacity, d = fixed["pseudo"].shape
        q = attention_select.query(state["train"]["query"], fixed["pseudo"].reshape(-1, d))
        scores = attention_select.attention_logits(self._keys(state, True), q, self._active(fixed))
        targets = jnp.repeat(fixed["targets"], capacity, axis=0)
        per_input = jax.vmap(lambda s, t: attention_select.kl_to_target(s[None], t))(scores, targets)
        past = (jnp.arange(num_tasks) < fixed["current"]).astype(jnp.float32)[:, None]
        weights = fixed["pseudo_valid"] * past
        per_task = jnp.sum(per_input.reshape(num_tasks, capacity) * weights, axis=1)
        per_task = per_task / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        return self.kl_ratio * jnp.sum(per_task)

    # -- end-of-task statistics ------------------------------------------------------------------
    def _mean_attention(self, table: jax.Array, state, batches) -> Optional[jax.Array]:
        """``(T,)`` mean attention over the real rows of ``batches``; None when there are none."""
        attend = jax.jit(functools.partial(self.attention, training=False))
        total, count = 0.0, 0
        for batch in batches or ():
            real = np.asarray(batch["real"], bool)
            a = attend(table, state, {k: jnp.asarray(v) for k, v in batch.items() if k in _QUERY_INPUTS})
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

    def _pseudo_inputs(self, table: jax.Array, state, task: TaskInfo, prompts: list) -> jax.Array:
        """``(n, d)`` pooled embeddings of the task's pseudo-inputs (module docstring)."""
        n = int(np.clip(round(self.pseudo_fraction * len(prompts)), self.pseudo_min, self.pseudo_capacity))
        if self.pseudo_source == "real":
            picked = [prompts[i] for i in np.unique(np.linspace(0, len(prompts) - 1, n).round().astype(int))]
            ids, mask = _pad_rows(picked, max(len(p) for p in picked), left=False)
            return pool_embeddings(table, jnp.asarray(ids), jnp.asarray(mask))
        header = common_prefix(prompts)
        if header.size == 0:
            raise ValueError(f"sapt: the prompts of task {task.name!r} share no common prefix for the language model "
                             "to continue; use pseudo_source: real")
        model = task.model
        left = not model.is_encoder_decoder
        length = _PREFIX_BUCKET * math.ceil(header.size / _PREFIX_BUCKET)
        ids, mask = _pad_rows([header] * n, length, left=left)
        graphdef, weights = nnx.split(model)
        key = jax.random.fold_in(jax.random.PRNGKey(state["fixed"]["seed"]), task.index)
        sampled = sample_continuations(graphdef, weights, jnp.asarray(ids), jnp.asarray(mask), key,
                                       new_tokens=self.pseudo_new_tokens, temperature=self.pseudo_temperature)
        # A sample ends before its first end-of-sequence token.
        ended = jnp.cumsum(jnp.isin(sampled, jnp.asarray(_eos_ids(model) or (-1,), jnp.int32)), axis=1) > 0
        ids = jnp.concatenate([jnp.asarray(ids), sampled], axis=1)
        mask = jnp.concatenate([jnp.asarray(mask), (~ended).astype(jnp.int32)], axis=1)
        return pool_embeddings(table, ids, mask)

    def report(self, state):
        fixed = state["fixed"]
        return {
            # row t: mean attention over task t's (training) inputs right after task t, over tasks <= t
            "mean_attention": np.asarray(fixed["targets"], np.float64).round(6).tolist(),
            "pseudo_source": self.pseudo_source,
            "pseudo_inputs_per_task": np.asarray(fixed["pseudo_valid"]).sum(axis=1).astype(int).tolist(),
        }
