"""Any-SSR: analytic subspace routing.

Math: docs/any_ssr.md.

The first ``L_f`` layers of the frozen base model are a shared feature extractor. A closed-form
router on top of them picks, for every example, which task's LoRA the later layers use:

  h = final_norm(mean over the prompt tokens of layer L_f's output)    (d,)
  φ = h @ W_fe                                                           (E,)  W_fe random, frozen
  k* = argmax over the tasks seen so far of φ @ W                        W (E, T): ridge weights

``W`` is fitted task by task with recursive least squares (``jaxcl.kernels.rls``) on one-hot task
labels, each task on its own training data only: because the block Woodbury update is exact, the
router after task t equals ridge regression trained jointly on the data of tasks 0..t (no replay, no
forgetting of the router itself). The router's columns for all ``T`` tasks are allocated at init and
stay zero until their task is seen (``rls.add_outputs`` semantics), and a ``seen`` mask keeps unseen
columns out of the argmax.

Each task trains its own LoRA (q and v, r=8, α=32, dropout 0.1, fresh init) on layers ≥ ``L_f``
only. The LoRA bank (``lora_bank.py``) stores adapters for every layer so that the model's layer
scan sees one stacked array per site; a per-layer gate (zeros below ``L_f``) multiplies every LoRA's
output, so the feature-extractor layers get exactly no LoRA and their ``a``/``b`` entries get zero
gradient — they are allocated but never used (``report`` counts only the gated-in layers).
``frozen_below`` declares those layers, so a wrapper that tunes the backbone (``mist+any_ssr``)
leaves them alone and the router's features never drift.

At inference the router runs on the left-padded prompt (mean over ``attention_mask`` tokens) and the
routed LoRA is used for the prompt and for every generated token, per example inside a batch (the
official code routes batch-1). The column of the LoRA being trained is never picked at evaluation.

Choices where the paper/official code leave room (all dataclass fields):
  - ``feature_layers=None`` scales the paper's 4-of-32 (LLaMA-2-7B) with depth:
    ``max(1, round(num_layers * 4 / 32))``.
  - ``expansion_std=0.02``: W_fe ~ N(0, 0.02²), no bias — the official code's ``nn.Linear`` after
    HF's ``post_init`` (LLaMA's initializer_range, zero bias). Its scale matters relative to γ.
  - ``norm_each_token=False`` final-norms the token mean; ``True`` follows
    the official code's order (mean of the final-normed tokens).
  - ``relu=False`` (official code: no activation after the expansion).

Memory (float32): R is ``E²·4`` bytes (E=10000: 400 MB) and W_fe ``d·E·4`` (LLaMA-2-7B: 164 MB);
both live in the fixed state, so every Orbax checkpoint holds them too. An RLS block of ``n`` rows
costs ``O(n·E²)`` flops and an ``(n, E)`` + ``(E, E)`` working set. On small CPUs use a smaller
``expansion_dim`` (the CPU demo uses 2048).

References:
  Any-SSR: analytic subspace routing for continual learning of LLMs (official code:
  github.com/ZHUANGHP/Any-SSR); recursive least squares: ``jaxcl.kernels.rls``.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, final

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcl.kernels import rls
from jaxcl.methods.axes import logical
from jaxcl.methods.base import Method, MethodState
from jaxcl.methods.lora_bank import Current, LoRABank, LoRAOptions, Past, begin_incremental, finish_incremental
from jaxcl.methods.per_task import own_slot_weights


def auto_feature_layers(num_layers: int) -> int:
    """The paper's 4 feature layers of 32, scaled to a model of ``num_layers`` layers (at least 1)."""
    return max(1, round(num_layers * 4 / 32))


def prompt_features(model, w_fe: jax.Array, input_ids: jax.Array, prompt_mask: jax.Array, depth: int,
                    relu: bool = False, norm_each_token: bool = False) -> jax.Array:
    """Router features φ of a batch of prompts.

    Args:
      model: a decoder-only model with ``hidden(ids, mask, num_layers=, final_norm=)`` and ``final_norm``.
      w_fe: ``(d, E)`` random expansion.
      input_ids: ``(B, S)`` token ids (left- or right-padded; training rows may carry the answer too).
      prompt_mask: ``(B, S)`` 1 on the prompt tokens to pool over, 0 elsewhere.
      depth: number of base layers that form the feature extractor (``L_f``).
      relu: apply a ReLU after the expansion.
      norm_each_token: final-norm every token before pooling (official code) instead of the mean.

    Returns:
      ``(B, E)`` float32.
    """
    # Padding and answer tokens are masked out of attention too; causal attention means prompt tokens
    # never see the answer, so training rows and evaluation prompts give the same features.
    attention = prompt_mask.astype(jnp.int32)
    h = model.hidden(input_ids, attention, num_layers=depth, final_norm=False)
    if norm_each_token:
        h = model.final_norm(h)
    keep = prompt_mask.astype(bool)[..., None]
    total = jnp.sum(jnp.where(keep, h.astype(jnp.float32), 0.0), axis=1)
    pooled = total / jnp.maximum(jnp.sum(keep, axis=1), 1).astype(jnp.float32)
    if not norm_each_token:
        pooled = model.final_norm(pooled)
    phi = jnp.matmul(pooled.astype(jnp.float32), w_fe, precision=jax.lax.Precision.HIGHEST)
    return jax.nn.relu(phi) if relu else phi


@nnx.jit(static_argnames=("depth", "relu", "norm_each_token"))
def _prompt_features_jit(model, w_fe, input_ids, prompt_mask, *, depth, relu, norm_each_token):
    return prompt_features(model, w_fe, input_ids, prompt_mask, depth, relu, norm_each_token)


class Router(NamedTuple):
    """Attributes:
      w_fe: ``(d, E)`` the frozen random expansion.
      R: ``(E, E)`` and W: ``(E, T)``: the ridge state (``kernels.rls.RLSState``).
      seen: ``(T,)`` bool, tasks whose column has been fitted.
    """

    w_fe: jax.Array
    R: jax.Array
    W: jax.Array
    seen: jax.Array


class AnySSRFixed(NamedTuple):
    past: dict
    router: Router


@final
@dataclasses.dataclass(frozen=True)
class AnySSR(LoRAOptions, Method):
    """Per-task LoRAs on layers ≥ L_f, routed per example by a closed-form RLS router.

    Attributes (besides the LoRA options ``sites, rank, alpha, dropout``):
      feature_layers: L_f, the frozen feature-extractor depth; None = ``auto_feature_layers``.
      expansion_dim: E, width of the random expansion (official 10000).
      expansion_std: standard deviation of W_fe's normal entries.
      relu: ReLU after the expansion (official: none).
      gamma: ridge strength γ of the router (official 100).
      router_block_size: rows per RLS (Woodbury) step when fitting a task.
      norm_each_token: pool final-normed tokens (official code) instead of final-norming the mean.
    """

    name = "any_ssr"
    routes = True
    feature_layers: Optional[int] = None
    expansion_dim: int = 10000
    expansion_std: float = 0.02
    relu: bool = False
    gamma: float = 100.0
    router_block_size: int = 256
    norm_each_token: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.feature_layers is not None and self.feature_layers < 1:
            raise ValueError(f"feature_layers must be >= 1 (or null for auto), got {self.feature_layers}")
        if self.expansion_dim < 1 or self.router_block_size < 1:
            raise ValueError(f"expansion_dim and router_block_size must be >= 1, got "
                             f"{self.expansion_dim}, {self.router_block_size}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")

    def depth(self, num_layers: int) -> int:
        """L_f for a model of ``num_layers`` layers."""
        depth = auto_feature_layers(num_layers) if self.feature_layers is None else self.feature_layers
        if depth >= num_layers:
            raise ValueError(f"feature_layers={depth} leaves no layer for the LoRAs: the model has {num_layers}")
        return depth

    def frozen_below(self, num_layers):
        return self.depth(num_layers)

    def init(self, key, model, num_tasks):
        if model.encoder_decoder:
            raise ValueError("any_ssr needs a decoder-only (Llama-style) model: its router reads the hidden "
                             "states of the first layers")
        key_lora, key_fe = jax.random.split(key)
        num_layers = model.site_shapes["attn.q"][0]
        self.depth(num_layers)
        state = rls.init(self.expansion_dim, num_tasks, self.gamma, dtype=jnp.float32)
        w_fe = self.expansion_std * jax.random.normal(key_fe, (model.hidden_size, self.expansion_dim), jnp.float32)
        router = Router(logical(w_fe, ("embed", "expansion")), logical(state.R, ("expansion", "expansion")),
                        logical(state.W, ("expansion", "tasks")), logical(jnp.zeros((num_tasks,), bool), ("tasks",)))
        return MethodState(Current(self.bank.current(key_lora, model)),
                           AnySSRFixed(self.bank.past(model, num_tasks), router))

    def begin_task(self, key, state, task):
        return state._replace(params=Current(begin_incremental(self.bank, key, task.index, state.params.lora)))

    # -- adapters: the bank, gated to layers >= L_f ----------------------------------------------
    def _gate(self, state) -> jax.Array:
        num_layers = next(iter(state.params.lora.values())).a.shape[0]
        return (jnp.arange(num_layers) >= self.depth(num_layers)).astype(jnp.float32)

    def adapter(self, state, ctx, key=None):
        return self.bank.adapter(state.params.lora, state.fixed.past, ctx, key, layer_gate=self._gate(state))

    def train_ctx(self, model, state, batch, step):
        del model
        return own_slot_weights(batch["task_ids"], step.task, LoRABank.num_slots(state.fixed.past))

    # -- routing ---------------------------------------------------------------------------------
    def _features(self, model, state, input_ids, prompt_mask, jit: bool = False):
        depth = self.depth(next(iter(state.params.lora.values())).a.shape[0])
        fn = _prompt_features_jit if jit else prompt_features
        kwargs = {"depth": depth, "relu": self.relu, "norm_each_token": self.norm_each_token}
        return fn(model, state.fixed.router.w_fe, input_ids, prompt_mask, **kwargs)

    def router_scores(self, model, state, batch) -> jax.Array:
        """``(B, T)`` router outputs φW of left-padded prompts; columns of unseen tasks are ``-inf``."""
        router = state.fixed.router
        phi = self._features(model, state, batch["input_ids"], batch["attention_mask"])
        scores = rls.predict(rls.RLSState(router.R, router.W), phi)
        return jnp.where(router.seen, scores, -jnp.inf)

    def route(self, model, state, batch):
        return jnp.argmax(self.router_scores(model, state, batch), axis=-1).astype(jnp.int32)

    def eval_ctx(self, model, state, batch):
        # Routed, not told: the task ids of the batch are not read. -1 marks no row as current.
        return own_slot_weights(self.route(model, state, batch), jnp.int32(-1), LoRABank.num_slots(state.fixed.past))

    def end_task(self, state, task):
        if task.model is None or task.batches is None:
            raise ValueError("any_ssr.end_task needs TaskInfo.model and TaskInfo.batches to fit its router")
        past, current = finish_incremental(state.fixed.past, state.params.lora, task.index)
        features = []
        for batch in task.batches():
            prompt = np.asarray(batch["attention_mask"]) * (1 - np.asarray(batch["loss_mask"]))
            phi = self._features(task.model, state, jnp.asarray(batch["input_ids"]), jnp.asarray(prompt), jit=True)
            features.append(np.asarray(phi)[np.asarray(batch["real"], bool)])
        features = np.concatenate(features)
        router = state.fixed.router
        targets = np.zeros((len(features), router.W.shape[1]), np.float32)
        targets[:, task.index] = 1.0
        fitted = rls.update_blocks(rls.RLSState(router.R, router.W), jnp.asarray(features),
                                   jnp.asarray(targets), block_size=self.router_block_size)
        router = Router(router.w_fe, fitted.R, fitted.W, router.seen.at[task.index].set(True))
        return MethodState(Current(current), AnySSRFixed(past, router))

    def report(self, state):
        gate = np.asarray(self._gate(state))
        router = state.fixed.router
        lora_params = sum(int(gate.sum()) * (l.a[0].size + l.b[0].size) for l in state.params.lora.values())
        return {"feature_layers": int(gate.size - gate.sum()), "num_layers": int(gate.size),
                "expansion_dim": int(router.w_fe.shape[1]),
                "lora_params_per_task": lora_params,
                "router_bytes": int(sum(np.asarray(x).nbytes for x in (router.w_fe, router.R, router.W)))}
