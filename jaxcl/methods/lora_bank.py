"""A bank of per-task LoRAs at a set of sites, mixed per example (a component, not a method).

The LoRA methods (SeqLoRA, IncLoRA, O-LoRA, MTL, the per-task oracle, Any-SSR, SAPT) each hold a
``LoRABank`` and call it. Per site the bank's arrays are

  current:  ``LoRA(a=(L, r, d_in), b=(L, d_out, r))``           the task being trained (params)
  past:     ``LoRA(a=(L, T, r, d_in), b=(L, T, d_out, r))``     slot t = task t, frozen (fixed)

and a site adds ``(alpha/r) · (w_cur · LoRA_cur(x) + Σ_t w_t · LoRA_t(x))``
(``kernels.lora.apply`` / ``apply_bank``) with per-example weights ``(B, T + 1)`` (columns
``0..T-1`` the past slots, column ``T`` the current LoRA) given by the method, or all ones. The past
bank has one slot per task of the stream from the start, zero until its task ends (a zero LoRA adds
nothing), so every task trains and evaluates with the same shapes: one compiled program per run.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxcl.kernels import lora as lora_kernel
from jaxcl.methods.axes import logical
from jaxcl.methods.base import Method, MethodState, ModelInfo
from jaxcl.models.sites import Adapter, SiteHook, resolve_sites


class LoRA(NamedTuple):
    """One site's LoRA matrices, stacked over layers (and task slots in the past bank)."""

    a: jax.Array
    b: jax.Array


def _per_example(w: jax.Array, like: jax.Array) -> jax.Array:
    """Broadcast a (B,) weight against a (B, ..., d) activation."""
    return w.reshape(w.shape + (1,) * (like.ndim - 1)).astype(like.dtype)


@dataclasses.dataclass(frozen=True)
class LoRABank:
    """Attributes:
      sites: site names or suffixes to adapt (``models.sites.resolve_sites``; PEFT's
        ``target_modules`` names such as ``q_proj`` work too).
      rank, alpha, dropout: LoRA hyper-parameters (O-LoRA's defaults r=8, α=32, dropout 0.1).
    """

    sites: tuple = ("attn.q", "attn.v")
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.1

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    # -- state ------------------------------------------------------------------------------------
    def current(self, key: jax.Array, model: ModelInfo) -> dict:
        """Fresh LoRAs ``{site: LoRA}`` (a Kaiming-uniform, b zero) with their logical axes."""
        out = {}
        sites = resolve_sites(model.site_shapes, self.sites)
        for site, k in zip(sites, jax.random.split(key, len(sites))):
            num_layers, d_in, d_out = model.site_shapes[site]
            fresh = jax.vmap(lambda kk: lora_kernel.init(kk, d_in, d_out, self.rank))(jax.random.split(k, num_layers))
            d_in_axis, d_out_axis = model.site_axes[site]
            out[site] = LoRA(logical(fresh["a"], ("layers", "rank", d_in_axis)),
                             logical(fresh["b"], ("layers", d_out_axis, "rank")))
        return out

    def past(self, model: ModelInfo, num_tasks: int) -> dict:
        """An empty past bank ``{site: LoRA}`` with one zero slot per task."""
        out = {}
        for site in resolve_sites(model.site_shapes, self.sites):
            num_layers, d_in, d_out = model.site_shapes[site]
            d_in_axis, d_out_axis = model.site_axes[site]
            out[site] = LoRA(
                logical(jnp.zeros((num_layers, num_tasks, self.rank, d_in)), ("layers", "tasks", "rank", d_in_axis)),
                logical(jnp.zeros((num_layers, num_tasks, d_out, self.rank)), ("layers", "tasks", d_out_axis, "rank")))
        return out

    def redraw(self, key: jax.Array, current: dict) -> dict:
        """Fresh LoRAs shaped like ``current`` (a new task's adapter)."""
        out = {}
        for site, k in zip(sorted(current), jax.random.split(key, len(current))):
            num_layers, rank, d_in = current[site].a.shape
            d_out = current[site].b.shape[1]
            fresh = jax.vmap(lambda kk: lora_kernel.init(kk, d_in, d_out, rank))(jax.random.split(k, num_layers))
            out[site] = LoRA(fresh["a"], fresh["b"])
        return out

    @staticmethod
    def store(past: dict, current: dict, slot) -> dict:
        """The past bank with the current LoRAs written into task slot ``slot``."""
        return jax.tree.map(lambda p, c: p.at[:, slot].set(c), past, current)

    @staticmethod
    def num_slots(past: dict) -> int:
        """T, the number of task slots of a past bank."""
        return next(iter(past.values())).a.shape[1]

    # -- the forward pass --------------------------------------------------------------------------
    def adapter(self, current: dict, past: Optional[dict], weights: Optional[jax.Array],
                key: Optional[jax.Array] = None, layer_gate: Optional[jax.Array] = None) -> Adapter:
        """The adapter of one forward pass.

        Args:
          current: ``{site: LoRA}`` the current LoRAs.
          past: the past bank, or None (SeqLoRA keeps none).
          weights: ``(B, T + 1)`` per-example weights (past slots, then the current LoRA), or None to
            sum every adapter.
          key: dropout key (training), or None.
          layer_gate: ``(L,)`` 0/1 per layer multiplying every LoRA's output (Any-SSR leaves its
            feature layers without LoRA), or None.
        """
        params = {}
        keys = None if key is None or self.dropout == 0 else jax.random.split(key, len(current))
        for i, site in enumerate(sorted(current)):
            p = {"cur": current[site]}
            if past is not None:
                p["past"] = past[site]
            if keys is not None:
                p["key"] = jax.random.split(keys[i], current[site].a.shape[0])
            if layer_gate is not None:
                p["gate"] = layer_gate
            params[site] = p
        return Adapter(SiteHook(delta_fn=self._delta), params, weights)

    def _delta(self, name: str, p: dict, x: jax.Array, weights: Any) -> jax.Array:
        del name
        x = lora_kernel.dropout(p.get("key"), x, self.dropout)
        cur = p["cur"]
        out = lora_kernel.apply({"a": cur.a, "b": cur.b}, x, self.alpha, self.rank)
        if weights is not None:
            out = out * _per_example(weights[:, -1], out)
        if "past" in p:
            past = p["past"]
            w = None if weights is None else weights[:, : past.a.shape[0]]
            out = out + lora_kernel.apply_bank(past.a, past.b, x, self.alpha, self.rank, w)
        if "gate" in p:
            out = out * p["gate"].astype(out.dtype)
        return out

    # -- facts ------------------------------------------------------------------------------------
    def params_per_task(self, current: dict) -> int:
        """Trainable entries of one task's LoRAs."""
        return sum(l.a.size + l.b.size for l in current.values())


@dataclasses.dataclass(frozen=True)
class LoRAOptions:
    """The LoRA hyper-parameters a LoRA method exposes as its own fields (flat in ``method_args``).

    A fields-only base of the LoRA methods' dataclasses; ``bank`` is the component built from them.
    """

    sites: tuple = ("attn.q", "attn.v")
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.1

    def __post_init__(self):
        self.bank  # validates the options

    @property
    def bank(self) -> LoRABank:
        return LoRABank(self.sites, self.rank, self.alpha, self.dropout)


class Current(NamedTuple):
    """Params of a LoRA method: the LoRAs being trained, ``{site: LoRA}``."""

    lora: dict


class Past(NamedTuple):
    """Fixed state of an incremental LoRA method: the past bank, ``{site: LoRA}``."""

    past: dict


def begin_incremental(bank: LoRABank, key: jax.Array, task_index: int, current: dict) -> dict:
    """The current LoRAs at the start of a task of an incremental method: task 0 keeps the ones
    drawn at ``init``, later tasks draw fresh ones."""
    return current if task_index == 0 else bank.redraw(key, current)


def finish_incremental(past: dict, current: dict, slot: int) -> tuple[dict, dict]:
    """``(past, current)`` at the end of a task: the trained LoRAs move into their slot and the
    current ones become zero (they add nothing until the next task draws fresh ones)."""
    return LoRABank.store(past, current, slot), jax.tree.map(jnp.zeros_like, current)


class IncrementalLoRA(LoRAOptions, Method):
    """A new LoRA per task at the bank's sites, finished ones frozen in their slots (abstract: the
    subclass says how the adapters are weighted, through ``adapter``)."""

    def init(self, key, model, num_tasks):
        return MethodState(Current(self.bank.current(key, model)), Past(self.bank.past(model, num_tasks)))

    def begin_task(self, key, state, task):
        return state._replace(params=Current(begin_incremental(self.bank, key, task.index, state.params.lora)))

    def end_task(self, state, task):
        past, current = finish_incremental(state.fixed.past, state.params.lora, task.index)
        return MethodState(Current(current), Past(past))

    def report(self, state):
        return {"lora_params_per_task": self.bank.params_per_task(state.params.lora)}
