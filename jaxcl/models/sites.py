"""Adapter sites: the one hook through which a method reaches into a model.

Every linear projection a method may adapt is a *site*. A site computes

    y = x @ weight_fn(name, p, W, ctx) + delta_fn(name, p, x, ctx)

where ``p`` is the method's state for that site *in the current layer*, and ``ctx`` is a per-example
context (routing weights, task ids, ...) whose leaves have a leading batch axis. Models scan over
their layers, so a method keeps the state of a site stacked over layers: ``params[name]`` is a pytree
whose leaves have a leading ``num_layers`` axis, and the model slices it inside the scan. Sites that
are absent from ``params`` are plain linears, so a method pays only for the sites it adapts.

Site names inside a layer stack are path-like and stable (they are also the config vocabulary):
  Llama: ``attn.q attn.k attn.v attn.o mlp.gate mlp.up mlp.down``
  T5:    ``encoder.self_attn.{q,k,v,o}``, ``decoder.self_attn.{q,k,v,o}``,
         ``decoder.cross_attn.{q,k,v,o}``, ``{encoder,decoder}.mlp.{wi,wi_0,wi_1,wo}``
Weights are stored ``(d_in, d_out)`` so that a site is ``x @ W``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax

Array = jax.Array
# (site name, this layer's site state, x: (..., d_in), ctx) -> (..., d_out)
DeltaFn = Callable[[str, Any, Array, Any], Array]
# (site name, this layer's site state, W: (d_in, d_out), ctx) -> W'
WeightFn = Callable[[str, Any, Array, Any], Array]


@dataclasses.dataclass(frozen=True)
class SiteHook:
    """The static half of an adapter: pure functions, hashable, closed over by ``jit``."""

    delta_fn: Optional[DeltaFn] = None
    weight_fn: Optional[WeightFn] = None


class Adapter(NamedTuple):
    """What a method plugs into one forward pass.

    Attributes:
      hook: the method's ``SiteHook`` (static).
      params: ``{site name: pytree with leading (num_layers,) axis}``.
      ctx: per-example context, leaves with leading ``(batch,)`` axis, or ``None``.
    """

    hook: SiteHook
    params: Mapping[str, Any]
    ctx: Any = None


def layer_params(adapter: Optional[Adapter], prefix: str = "") -> dict:
    """The stacked site states whose names start with ``prefix`` (scanned with the layer weights)."""
    if adapter is None:
        return {}
    return {k: v for k, v in adapter.params.items() if k.startswith(prefix)}


def linear(adapter: Optional[Adapter], name: str, site_params: Mapping[str, Any], x: Array,
           w: Array) -> Array:
    """Apply the site ``name``: ``x @ W`` plus whatever the adapter adds.

    Args:
      adapter: the adapter of this forward pass, or ``None`` for the plain model.
      name: full site name, e.g. ``"attn.q"``.
      site_params: this layer's slice of ``layer_params(adapter, ...)`` (leading axis removed).
      x: ``(..., d_in)`` activations.
      w: ``(d_in, d_out)`` weight.

    Returns:
      ``(..., d_out)`` in ``x.dtype``.
    """
    p = site_params.get(name) if adapter is not None else None
    if p is None:
        return x @ w
    hook = adapter.hook
    if hook.weight_fn is not None:
        w = hook.weight_fn(name, p, w, adapter.ctx).astype(w.dtype)
    y = x @ w
    if hook.delta_fn is not None:
        y = y + hook.delta_fn(name, p, x, adapter.ctx).astype(y.dtype)
    return y
