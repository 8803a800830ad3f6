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

Methods choose their sites with ``resolve_sites``, by jaxcl suffix or by PEFT ``target_modules`` name.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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


# PEFT ``target_modules`` names (the transformers module names) -> the jaxcl site suffix they stand for.
LLAMA_PEFT_NAMES = {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.o",
                    "gate_proj": "mlp.gate", "up_proj": "mlp.up", "down_proj": "mlp.down"}
T5_PEFT_NAMES = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o",  # every attention's
                 "wi": "mlp.wi", "wi_0": "mlp.wi_0", "wi_1": "mlp.wi_1", "wo": "mlp.wo"}
PEFT_NAMES = {**LLAMA_PEFT_NAMES, **T5_PEFT_NAMES}  # the two vocabularies share no name


def resolve_sites(site_shapes: Mapping[str, Any], patterns: Sequence[str],
                  peft_names: Mapping[str, str] = PEFT_NAMES) -> list[str]:
    """The sorted site names of a model that ``patterns`` select.

    A pattern is a PEFT ``target_modules`` name (a key of ``peft_names``: ``"q_proj"`` is Llama's
    ``attn.q``, T5's ``"o"`` every attention's output projection but not ``mlp.wo``), which stands
    for its jaxcl suffix; any other pattern is a jaxcl site-name suffix, selecting every site whose
    name ends with it (``"attn.q"``: Llama's ``attn.q`` and T5's ``encoder.self_attn.q``,
    ``decoder.self_attn.q`` and ``decoder.cross_attn.q``).

    Args:
      site_shapes: the model's ``site_shapes()`` (only its keys are read).
      patterns: jaxcl suffixes and/or PEFT names.
      peft_names: PEFT name -> jaxcl suffix (a model's ``peft_names``; by default both families').

    Raises:
      ValueError: ``patterns`` is a single string, or some pattern matches no site.
    """
    if isinstance(patterns, str):
        raise ValueError(f"method sites must be a list of names, got the string {patterns!r}")
    suffixes = {p: peft_names.get(p, p) for p in patterns}
    unmatched = [p for p, suffix in suffixes.items() if not any(name.endswith(suffix) for name in site_shapes)]
    if unmatched:
        raise ValueError(f"method sites {unmatched} match no site of this model; it has {sorted(site_shapes)}")
    return sorted(name for name in site_shapes if any(name.endswith(s) for s in suffixes.values()))


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


def rewrites_weights(adapter: Optional[Adapter], names: Sequence[str], site_params: Mapping[str, Any]) -> bool:
    """Whether the adapter's ``weight_fn`` applies to one of the sites ``names`` (then these sites
    need their own weights and cannot share one GEMM)."""
    return (adapter is not None and adapter.hook.weight_fn is not None
            and any(site_params.get(name) is not None for name in names))


def linears(adapter: Optional[Adapter], names: Sequence[str], site_params: Mapping[str, Any], x: Array,
            weights: Sequence[Array], fused: Optional[Array] = None) -> list[Array]:
    """Apply several sites that read the same ``x`` (a layer's q/k/v, gate/up): ``linear`` of each.

    With ``fused`` (the sites' weights concatenated along ``d_out``) and no ``weight_fn`` rewriting
    one of them, the base projections are one GEMM ``x @ fused``, split into the sites' outputs, and
    each adapted site's ``delta_fn`` output is added to its part: the values of ``linear`` site by
    site, up to float rounding. Sites stay addressed one by one either way.

    Args:
      adapter, site_params: as for ``linear``.
      names: full site names.
      x: ``(..., d_in)``.
      weights: each site's ``(d_in, d_out_i)`` weight.
      fused: ``(d_in, sum d_out_i)``, or None (no fusion).

    Returns:
      One ``(..., d_out_i)`` output per site.
    """
    if fused is None or rewrites_weights(adapter, names, site_params):
        return [linear(adapter, name, site_params, x, w) for name, w in zip(names, weights)]
    ends = np.cumsum([w.shape[-1] for w in weights])[:-1]
    outputs = jnp.split(x @ fused, ends, axis=-1)
    if adapter is None or adapter.hook.delta_fn is None:
        return outputs
    return [y if site_params.get(name) is None
            else y + adapter.hook.delta_fn(name, site_params[name], x, adapter.ctx).astype(y.dtype)
            for name, y in zip(names, outputs)]


@dataclasses.dataclass(frozen=True)
class _Formed:
    """A hook whose weight rewrite was formed ahead (``form_weights``): a site's state is ``(the
    formed weight of this layer, the original state)``."""

    hook: SiteHook

    def weight(self, name, p, w, ctx):
        del name, w, ctx
        return p[0]

    def delta(self, name, p, x, ctx):
        return self.hook.delta_fn(name, p[1], x, ctx)


def form_weights(adapter: Optional[Adapter], weights: Mapping[str, Array]) -> Optional[Adapter]:
    """``adapter`` with its ``weight_fn`` evaluated once, for a loop that runs the sites many times.

    A decoding loop runs every site once per new token, and XLA does not hoist a weight rewrite out
    of the loop when its result is larger than its inputs (MIST's rewrite scatters every earlier
    task's sparse delta into a full float32 copy of the weight). Formed here, before the loop, it
    costs once per generation instead of once per token; the loop then reads the formed weights,
    one more copy of the adapted sites' weights in the model dtype. A rewrite that differs per
    example (SMAT's interpolated experts, ``(B, d_in, d_out)``) is left to the loop: formed for every
    layer at once it would hold ``B`` copies of the weights.

    Args:
      adapter: the adapter of a forward pass, or ``None``.
      weights: ``{site: (num_layers, d_in, d_out)}`` the model's stacked weights (``site_weights()``),
        at least those of the sites ``adapter`` adapts.

    Returns:
      An adapter giving ``linear`` the same values at every site: its ``weight_fn`` returns the formed
      weight and its ``delta_fn`` is the original one; ``adapter`` itself where there is no
      ``weight_fn`` or the rewrite has a batch axis.

    Examples:
      >>> import jax.numpy as jnp
      >>> hook = SiteHook(weight_fn=lambda name, p, w, ctx: w + p["d"])
      >>> w = jnp.ones((2, 3, 4))
      >>> formed = form_weights(Adapter(hook, {"mlp.up": {"d": jnp.full((2, 3, 4), 0.5)}}), {"mlp.up": w})
      >>> formed.params["mlp.up"][0].shape, float(formed.params["mlp.up"][0][1, 0, 0])
      ((2, 3, 4), 1.5)
    """
    if adapter is None or adapter.hook.weight_fn is None:
        return adapter
    hook, formed = adapter.hook, {}
    for name, p in adapter.params.items():
        if p is None:  # a plain linear (``linear``)
            formed[name] = None
            continue
        w = weights[name]
        # one layer at a time: the rewrite's float32 temporaries stay one layer's size
        layer_weight = lambda pw, name=name, dtype=w.dtype: hook.weight_fn(name, pw[0], pw[1], adapter.ctx).astype(dtype)
        new = jax.lax.map(layer_weight, (p, w))
        if new.shape != w.shape:  # per example: left to the loop (nothing traced here is used)
            return adapter
        formed[name] = (new, p)
    wrapped = _Formed(hook)
    return Adapter(SiteHook(delta_fn=None if hook.delta_fn is None else wrapped.delta, weight_fn=wrapped.weight),
                   formed, adapter.ctx)


class Observer(NamedTuple):
    """A request to evaluate ``fn(site, x, token_mask)`` on the input ``x`` ``(B, S, d_in)`` of each of
    ``sites`` (see the models' ``observe``); ``token_mask`` ``(B, S)`` (1 = token, 0 = padding) is in
    ``x``'s dtype."""

    fn: Callable[[str, Array, Array], Any]
    sites: frozenset[str]
    token_mask: Array


def observe(observer: Optional[Observer], names: Sequence[str], x: Array) -> dict:
    """``{site: fn(site, x, token_mask)}`` for the sites of ``names`` that ``observer`` asks for."""
    if observer is None:
        return {}
    return {name: observer.fn(name, x, observer.token_mask.astype(x.dtype))
            for name in names if name in observer.sites}


@dataclasses.dataclass(frozen=True)
class _Both:
    """The weight and delta functions of two hooks applied in turn at every site either adapts."""

    first: SiteHook
    second: SiteHook

    def weight(self, name, p, w, ctx):
        for hook, part, c in zip((self.first, self.second), p, ctx):
            if part is not None and hook.weight_fn is not None:
                w = hook.weight_fn(name, part, w, c)
        return w

    def delta(self, name, p, x, ctx):
        out = None
        for hook, part, c in zip((self.first, self.second), p, ctx):
            if part is not None and hook.delta_fn is not None:
                d = hook.delta_fn(name, part, x, c)
                out = d if out is None else out + d.astype(out.dtype)
        return jnp.zeros((), x.dtype) if out is None else out


def combine(first: Optional[Adapter], second: Optional[Adapter]) -> Optional[Adapter]:
    """One adapter doing what both do: at each site, ``second``'s weight function after ``first``'s,
    and the sum of their deltas (a wrapper's weight delta with the inner method's LoRA, say)."""
    if first is None or second is None:
        return second if first is None else first
    names = sorted(set(first.params) | set(second.params))
    params = {n: (first.params.get(n), second.params.get(n)) for n in names}
    both = _Both(first.hook, second.hook)
    return Adapter(SiteHook(delta_fn=both.delta, weight_fn=both.weight), params, (first.ctx, second.ctx))
