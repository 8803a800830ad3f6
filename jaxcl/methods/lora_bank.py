"""A bank of per-task LoRAs at a set of sites, mixed per example.

This is the adapter shared by the LoRA family (SeqLoRA, IncLoRA, O-LoRA, the per-task oracle, and
later Any-SSR and SAPT). Per site the bank holds

  ``fixed["past"][site]``: ``{"a": (L, T, r, d_in), "b": (L, T, d_out, r)}``  (frozen; slot t = task t)
  ``train["lora"][site]``: ``{"a": (L, r, d_in), "b": (L, d_out, r)}``        (the task being trained)

and a site adds ``(alpha/r) * Σ_t w_t (x a_tᵀ) b_tᵀ`` where the weights ``w`` (B, T + 1) come from the
per-example context (``ctx["task_weights"]``: columns 0..T-1 = the past slots, column T = the current
LoRA) or are all ones when the context is ``None`` (IncLoRA / O-LoRA sum every adapter). The past
bank has one slot per task of the stream from the start, zero until its task ends (a zero LoRA adds
nothing and costs a rank-r product), so every task trains and evaluates with the same shapes: the
train and generation steps compile once per run, not once per task. Merged weights are never
materialised.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jaxcl.kernels import lora as lora_kernel
from jaxcl.methods.base import Method, SiteShapes, State, TaskInfo
from jaxcl.models.sites import Adapter, SiteHook


def select_sites(site_shapes: SiteShapes, patterns: tuple[str, ...]) -> list[str]:
    """The model's site names that end with one of ``patterns``: ``"attn.q"`` picks Llama's
    ``attn.q`` and T5's ``encoder.self_attn.q``, ``decoder.self_attn.q`` and ``decoder.cross_attn.q``."""
    unmatched = [p for p in patterns if not any(name.endswith(p) for name in site_shapes)]
    if unmatched:
        raise ValueError(f"method sites {unmatched} match no site of this model; it has {sorted(site_shapes)}")
    return sorted(name for name in site_shapes if any(name.endswith(p) for p in patterns))


def init_bank(key: jax.Array, site_shapes: SiteShapes, patterns: tuple[str, ...], rank: int) -> dict:
    """Fresh LoRAs ``{site: {"a": (L, r, d_in), "b": (L, d_out, r)}}`` (a Kaiming-uniform, b zero) at
    every site selected by ``patterns`` (see ``select_sites``)."""
    sites = select_sites(site_shapes, patterns)
    bank = {}
    for site, k in zip(sites, jax.random.split(key, len(sites))):
        num_layers, d_in, d_out = site_shapes[site]
        per_layer = jax.vmap(lambda kk: lora_kernel.init(kk, d_in, d_out, rank))(jax.random.split(k, num_layers))
        bank[site] = per_layer
    return bank


def empty_slots(bank: dict, num_tasks: int) -> dict:
    """A zero past bank ``{site: {"a": (L, T, r, d_in), "b": (L, T, d_out, r)}}`` shaped like ``bank``."""
    return jax.tree.map(lambda x: jnp.zeros((x.shape[0], num_tasks) + x.shape[1:], x.dtype), bank)


def store(past: dict, current: dict, slot: int) -> dict:
    """The past bank with the current LoRAs written into task slot ``slot``."""
    return jax.tree.map(lambda p, c: p.at[:, slot].set(c), past, current)


def num_slots(state: State) -> int:
    """T, the number of task slots of the past bank."""
    return next(iter(state["fixed"]["past"].values()))["a"].shape[1]


@dataclasses.dataclass(frozen=True)
class LoRABank(Method):
    """IncLoRA semantics: a new LoRA per task, past ones frozen, all summed.

    Attributes:
      sites: site-name suffixes to adapt (DESIGN §6: q and v of every attention block; see
        ``select_sites``).
      rank, alpha, dropout: LoRA hyper-parameters (O-LoRA defaults r=8, α=32, dropout 0.1).
      new_lora_per_task: False keeps training one LoRA across tasks (SeqLoRA).
    """

    name = "inc_lora"
    sites: tuple = ("attn.q", "attn.v")
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    new_lora_per_task: bool = True

    def init(self, key, site_shapes, num_tasks):
        lora = init_bank(key, site_shapes, self.sites, self.rank)
        fixed = {"past": empty_slots(lora, num_tasks)} if self.new_lora_per_task else {}
        return {"train": {"lora": lora}, "fixed": fixed}

    def begin_task(self, key, state, task: TaskInfo, site_shapes):
        if task.index == 0 or not self.new_lora_per_task:
            return state
        return {"train": {"lora": init_bank(key, site_shapes, self.sites, self.rank)}, "fixed": state["fixed"]}

    def end_task(self, state, task):
        if not self.new_lora_per_task:
            return state
        fixed = dict(state["fixed"], past=store(state["fixed"]["past"], state["train"]["lora"], task.index))
        # The finished LoRA now lives in its slot; the current LoRA is zeroed so that it adds nothing
        # until the next begin_task draws a fresh one.
        train = {"lora": jax.tree.map(jnp.zeros_like, state["train"]["lora"])}
        return {"train": train, "fixed": fixed}

    # -- the site hook ---------------------------------------------------------------------------
    @property
    def hook(self) -> SiteHook:
        return SiteHook(delta_fn=self._delta)

    def adapter(self, state, ctx, key=None):
        params = {}
        past = state["fixed"].get("past", {})  # SeqLoRA keeps no past
        sites = sorted(state["train"]["lora"])
        keys = None if key is None or self.dropout == 0 else jax.random.split(key, len(sites))
        for i, site in enumerate(sites):
            p = {"cur": state["train"]["lora"][site]}
            if site in past:
                p["past"] = past[site]
            if keys is not None:
                num_layers = p["cur"]["a"].shape[0]
                p["key"] = jax.random.split(keys[i], num_layers)
            params[site] = p
        return Adapter(self.hook, params, ctx)

    def _delta(self, name: str, p: dict, x: jax.Array, ctx: Any) -> jax.Array:
        if "key" in p:
            keep = jax.random.bernoulli(p["key"], 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        weights = None if ctx is None else ctx.get("task_weights")
        out = lora_kernel.apply(p["cur"], x, self.alpha, self.rank)
        if weights is not None:
            out = out * _per_example(weights[:, -1], out).astype(out.dtype)
        if "past" in p:
            a, b = (p["past"][k].astype(x.dtype) for k in ("a", "b"))
            h = jnp.einsum("...d,trd->...tr", x, a)
            if weights is not None:
                w = weights[:, : a.shape[0]].astype(x.dtype)
                h = h * w.reshape(w.shape[:1] + (1,) * (h.ndim - 3) + w.shape[1:] + (1,))
            out = out + (self.alpha / self.rank) * jnp.einsum("...tr,tor->...o", h, b)
        return out


def _per_example(w: jax.Array, like: jax.Array) -> jax.Array:
    """Broadcast a (B,) weight against a (B, ..., d) activation."""
    return w.reshape(w.shape + (1,) * (like.ndim - 1))
