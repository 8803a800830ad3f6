"""Any-SSR: analytic subspace routing (DESIGN §6).

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
scan sees one stacked array per site; a fixed per-layer gate ``fixed["lora_layers"]`` (L,) with zeros
below ``L_f`` multiplies the ``b`` matrices, so the feature-extractor layers get exactly no LoRA (a
zero ``b`` adds exactly zero) and their ``a``/``b`` entries get zero gradient — they are allocated but
never used (``report`` counts only the gated-in layers).

At inference the router runs on the left-padded prompt (mean over ``attention_mask`` tokens) and the
routed LoRA is used for the prompt and for every generated token, per example inside a batch (the
official code routes batch-1). The column of the LoRA being trained is never picked at evaluation.

Choices where the paper/official code leave room (all dataclass fields):
  - ``feature_layers=None`` scales the paper's 4-of-32 (LLaMA-2-7B) with depth:
    ``max(1, round(num_layers * 4 / 32))``.
  - ``expansion_std=0.02``: W_fe ~ N(0, 0.02²), no bias — the official code's ``nn.Linear`` after
    HF's ``post_init`` (LLaMA's initializer_range, zero bias). Its scale matters relative to γ.
  - ``norm_each_token=False`` follows DESIGN §6 (final-norm of the token mean); ``True`` follows
    the official code's order (mean of the final-normed tokens).
  - ``relu=False`` (official code: no activation after the expansion).

Memory (float32): R is ``E²·4`` bytes (E=10000: 400 MB) and W_fe ``d·E·4`` (LLaMA-2-7B: 164 MB);
both live in the fixed state, so every Orbax checkpoint holds them too. An RLS block of ``n`` rows
costs ``O(n·E²)`` flops and an ``(n, E)`` + ``(E, E)`` working set. On small CPUs use a smaller
``expansion_dim`` (the CPU demo uses 2048).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcl.kernels import rls
from jaxcl.methods.lora_bank import num_slots
from jaxcl.methods.per_task import PerTask, one_hot_ctx


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


@dataclasses.dataclass(frozen=True)
class AnySSR(PerTask):
    """Per-task LoRAs on layers ≥ L_f, routed per example by a closed-form RLS router.

    Attributes (besides the LoRA bank's ``sites, rank, alpha, dropout``):
      feature_layers: L_f, the frozen feature-extractor depth; None = ``auto_feature_layers``.
      expansion_dim: E, width of the random expansion (official 10000).
      expansion_std: standard deviation of W_fe's normal entries.
      relu: ReLU after the expansion (official: none).
      gamma: ridge strength γ of the router (official 100).
      router_block_size: rows per RLS (Woodbury) step when fitting a task.
      norm_each_token: pool final-normed tokens (official code) instead of final-norming the mean.
    """

    name = "any_ssr"
    feature_layers: Optional[int] = None
    expansion_dim: int = 10000
    expansion_std: float = 0.02
    relu: bool = False
    gamma: float = 100.0
    router_block_size: int = 256
    norm_each_token: bool = False

    def __post_init__(self):
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

    def init(self, key, site_shapes, num_tasks):
        if "attn.q" not in site_shapes:
            raise ValueError("any_ssr needs a decoder-only (Llama-style) model: its router reads the hidden "
                             f"states of the first layers; this model's sites are {sorted(site_shapes)}")
        key_lora, key_fe = jax.random.split(key)
        state = super().init(key_lora, site_shapes, num_tasks)
        num_layers, d_model, _ = site_shapes["attn.q"]
        gate = (np.arange(num_layers) >= self.depth(num_layers)).astype(np.float32)
        router = rls.init(self.expansion_dim, num_tasks, self.gamma)
        fixed = dict(state["fixed"], lora_layers=jnp.asarray(gate), router={
            "w_fe": self.expansion_std * jax.random.normal(key_fe, (d_model, self.expansion_dim), jnp.float32),
            "R": router.R, "W": router.W, "seen": jnp.zeros((num_tasks,), bool)})
        return {"train": state["train"], "fixed": fixed}

    # -- adapters: the bank, gated to layers >= L_f ----------------------------------------------
    def adapter(self, state, ctx, key=None):
        gate = state["fixed"]["lora_layers"]

        def gated(bank):
            return {site: dict(p, b=p["b"] * gate.reshape((-1,) + (1,) * (p["b"].ndim - 1)).astype(p["b"].dtype))
                    for site, p in bank.items()}

        gated_state = {"train": dict(state["train"], lora=gated(state["train"]["lora"])),
                       "fixed": dict(state["fixed"], past=gated(state["fixed"]["past"]))}
        return super().adapter(gated_state, ctx, key)

    # -- routing ---------------------------------------------------------------------------------
    def _features(self, model, state, input_ids, prompt_mask, jit: bool = False):
        depth = self.depth(state["fixed"]["lora_layers"].shape[0])
        fn = _prompt_features_jit if jit else prompt_features
        kwargs = {"depth": depth, "relu": self.relu, "norm_each_token": self.norm_each_token}
        return fn(model, state["fixed"]["router"]["w_fe"], input_ids, prompt_mask, **kwargs)

    def router_scores(self, model, state, batch) -> jax.Array:
        """``(B, T)`` router outputs φW of left-padded prompts; columns of unseen tasks are ``-inf``."""
        router = state["fixed"]["router"]
        phi = self._features(model, state, batch["input_ids"], batch["attention_mask"])
        scores = rls.predict(rls.RLSState(router["R"], router["W"]), phi)
        return jnp.where(router["seen"], scores, -jnp.inf)

    def route(self, model, state, batch):
        return jnp.argmax(self.router_scores(model, state, batch), axis=-1).astype(jnp.int32)

    def eval_ctx(self, model, state, batch, task):
        del task  # routed, not told
        return one_hot_ctx(self.route(model, state, batch), num_slots(state) + 1)

    def end_task(self, state, task):
        if task.model is None or task.batches is None:
            raise ValueError("any_ssr.end_task needs TaskInfo.model and TaskInfo.batches to fit its router")
        if task.model.is_encoder_decoder:
            raise ValueError("any_ssr needs a decoder-only model (its router reads model.hidden of the first layers)")
        state = super().end_task(state, task)
        features = []
        for batch in task.batches():
            prompt = np.asarray(batch["attention_mask"]) * (1 - np.asarray(batch["loss_mask"]))
            phi = self._features(task.model, state, jnp.asarray(batch["input_ids"]), jnp.asarray(prompt), jit=True)
            features.append(np.asarray(phi)[np.asarray(batch["real"], bool)])
        features = np.concatenate(features)
        router = state["fixed"]["router"]
        targets = np.zeros((len(features), router["W"].shape[1]), np.float32)
        targets[:, task.index] = 1.0
        fitted = rls.update_blocks(rls.RLSState(router["R"], router["W"]), jnp.asarray(features),
                                   jnp.asarray(targets), block_size=self.router_block_size)
        router = dict(router, R=fitted.R, W=fitted.W, seen=router["seen"].at[task.index].set(True))
        return {"train": state["train"], "fixed": dict(state["fixed"], router=router)}

    def report(self, state):
        gate = np.asarray(state["fixed"]["lora_layers"])
        router = state["fixed"]["router"]
        lora_params = sum(int(gate.sum()) * (p["a"][0].size + p["b"][0].size)
                          for p in state["train"]["lora"].values())
        return {"feature_layers": int(gate.size - gate.sum()), "num_layers": int(gate.size),
                "expansion_dim": int(router["w_fe"].shape[1]),
                "lora_params_per_task": lora_params,
                "router_bytes": int(sum(np.asarray(router[k]).nbytes for k in ("w_fe", "R", "W")))}
