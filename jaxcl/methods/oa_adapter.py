"""OA-Adapter: budget-adaptive bottleneck adapters in orthogonal subspaces.

Math: docs/oa_adapter.md.

Per task t, site and layer a bottleneck adapter adds

  Δy = s · W2_t diag(γ_t) W1_t x,   γ_t = sign(g_t) · max(|g_t| − τ_t, 0)

with W1_t ``(r_max, d_in)``, W2_t ``(d_out, r_max)``, a trainable gate vector g_t ``(r_max,)`` and a
trainable threshold τ_t. The soft threshold switches bottleneck dimensions off (exact zeros) and back
on during the one training stage of the task (τ moves both ways), so the task's budget at a site and
layer is ``r_eff = ‖γ_t‖₀``. The loss is

  CE + λ_orth Σ_sites Σ_layers Σ_{s<t} ‖W2_s[:, active_s]ᵀ W2_t‖_F²  +  l1 Σ |γ_t|

with active_s = (γ_s ≠ 0). Past tasks' adapters are frozen in preallocated slots (zero until their
task ends, as in ``lora_bank.py``, so shapes never change across tasks) and inference sums every
task's adapter. ``hard_projection=True`` additionally projects the columns of W2_t out of the span of
the past active columns after every optimizer update (jaxcl's own option, like O-LoRA's).

The paper gives no public code; the choices below are jaxcl's (dataclass fields, documented):
  - ``r_max=8``: the allocation equals O-LoRA's r=8 LoRA on the same sites, so "parameters used"
    (Σ r_eff·(d_in + d_out)) compares directly with O-LoRA's count.
  - Placement ``sites=("attn.q", "attn.v")`` like O-LoRA: site-name suffixes (``select_sites``), so
    on T5 they pick q and v of the encoder self-, decoder self- and decoder cross-attention.
  - ``scale`` s = 4 is O-LoRA's α/r = 32/8 (the paper's formula has no scale; it only fixes units):
    with every gate at 1 the adapter is exactly an r_max LoRA as O-LoRA trains it.
  - Initialisation: W1 like LoRA's ``a`` (Kaiming-uniform), W2 = 0 so a new adapter starts as the
    identity on the model's function; g = ``g_init`` = 1 for every dimension and τ = ``tau_init`` = 0,
    so training starts with all r_max dimensions on at unit gain.
  - τ is one scalar per (task, site, layer), held at τ ≥ 0 (clamped after every update; a negative
    τ would amplify every dimension instead of gating it): the budget of a site-layer moves as one,
    and a dimension switched off (no gradient through the flat part of the threshold) can come back
    on when τ falls below its |g|.
  - ``gate_lr_multiplier=20``: g and τ are stored divided by this factor and multiplied back in
    the forward pass. Adam's step does not depend on the gradient's scale, so this reparametrisation
    is what makes the gate move that many times faster than W1/W2 (with SGD the effective rate is
    multiplied by its square). A dimension needs ``(g_init − tau_init) / (2 · multiplier · lr)``
    steps of steady pressure to switch off: 25 at lr 1e-3, so budgets can change within one task
    even on short streams.
  - ``l1`` acts on γ (what the forward pass uses): on an active dimension it is ``|g| − τ``, so it
    pushes the threshold up and the gains down; dimensions survive where the task's loss pays for
    them. ``l1=0`` leaves budgets to the task loss alone.
  - ``lambda_orth=0.5`` (O-LoRA's λ1 value), ``dropout=0.1`` on the adapter input (O-LoRA's).

State: params ``{site: Bottleneck(w1 (L, r, d_in), w2 (L, d_out, r), g (L, r), tau (L,))}``; fixed
``OAFixed(past={site: PastBottlenecks(w1 (L, T, r, d_in), w2 (L, T, d_out, r), gamma (L, T, r))},
basis={site: (L, d_out, T·r)} with hard_projection, else {})`` — the stored γ is exactly zero off the
active set, so the active mask is ``gamma != 0``. The math is in ``jaxcl.kernels.bottleneck``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, final

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.kernels import bottleneck, lora as lora_kernel, orthogonal
from jaxcl.methods.axes import logical
from jaxcl.methods.base import Method, MethodState
from jaxcl.models.sites import Adapter, SiteHook, resolve_sites


ORTHOGONAL_TO = ("output", "input", "both")


class Bottleneck(NamedTuple):
    """The current task's adapter at one site, stacked over layers (g and τ in 1/multiplier units)."""

    w1: jax.Array
    w2: jax.Array
    g: jax.Array
    tau: jax.Array


class PastBottlenecks(NamedTuple):
    """Finished tasks' adapters at one site: one slot per task, γ already thresholded."""

    w1: jax.Array
    w2: jax.Array
    gamma: jax.Array


class OAFixed(NamedTuple):
    past: dict
    basis: dict


@final
@dataclasses.dataclass(frozen=True)
class OAAdapter(Method):
    """Attributes: see the module docstring for the reasoning behind each default.

    sites: site names or suffixes to adapt (``models.sites.resolve_sites``).
    r_max: allocated bottleneck width per task, site and layer.
    dropout: dropout rate on the adapter input (training only).
    lambda_orth: weight of the orthogonality penalty.
    l1: weight of the L1 penalty on the current task's gates γ.
    g_init, tau_init: initial gate value (every dimension) and threshold (>= 0).
    scale: output scale s of the adapter (O-LoRA's α/r).
    gate_lr_multiplier: how much faster (under Adam) g and τ train than W1 and W2.
    hard_projection: keep W2_t exactly orthogonal to past active columns after every update.
    orthogonal_to: which factor the penalty keeps apart from the past active dimensions:
      ``"output"`` (the paper: W2 columns), ``"input"`` (W1 rows, the side O-LoRA constrains with
      its A matrices: a new adapter then reads input directions the past ones did not) or ``"both"``.
    """

    name = "oa_adapter"
    sites: tuple = ("attn.q", "attn.v")
    r_max: int = 8
    dropout: float = 0.1
    lambda_orth: float = 0.5
    l1: float = 1e-3
    g_init: float = 1.0
    tau_init: float = 0.0
    scale: float = 4.0
    gate_lr_multiplier: float = 20.0
    hard_projection: bool = False
    orthogonal_to: str = "output"

    def __post_init__(self):
        if self.r_max < 1:
            raise ValueError(f"r_max must be >= 1, got {self.r_max}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.gate_lr_multiplier > 0:
            raise ValueError(f"gate_lr_multiplier must be > 0, got {self.gate_lr_multiplier}")
        if self.orthogonal_to not in ORTHOGONAL_TO:
            raise ValueError(f"orthogonal_to: expected one of {ORTHOGONAL_TO}, got {self.orthogonal_to!r}")
        if self.tau_init < 0:
            raise ValueError(f"tau_init must be >= 0 (a negative threshold amplifies), got {self.tau_init}")

    # -- state -----------------------------------------------------------------------------------
    def _fresh(self, key: jax.Array, shapes: dict) -> dict:
        """New adapters ``{site: Bottleneck}`` for ``{site: (L, d_in, d_out)}``."""
        out = {}
        for site, k in zip(sorted(shapes), jax.random.split(key, len(shapes))):
            num_layers, d_in, d_out = shapes[site]
            pair = jax.vmap(lambda kk: lora_kernel.init(kk, d_in, d_out, self.r_max))(jax.random.split(k, num_layers))
            out[site] = Bottleneck(pair["a"], pair["b"],
                                   jnp.full((num_layers, self.r_max), self.g_init / self.gate_lr_multiplier, jnp.float32),
                                   jnp.full((num_layers,), self.tau_init / self.gate_lr_multiplier, jnp.float32))
        return out

    def gates(self, current: Bottleneck) -> jax.Array:
        """γ ``(L, r)`` of one site's current adapter."""
        k = self.gate_lr_multiplier
        return bottleneck.soft_threshold(k * current.g, k * current.tau[:, None])

    def init(self, key, model, num_tasks):
        sites = resolve_sites(model.site_shapes, self.sites)
        fresh = self._fresh(key, {s: model.site_shapes[s] for s in sites})
        current, past, basis = {}, {}, {}
        for site in sites:
            num_layers, d_in, d_out = model.site_shapes[site]
            i, o = model.site_axes[site]
            f = fresh[site]
            current[site] = Bottleneck(logical(f.w1, ("layers", "rank", i)), logical(f.w2, ("layers", o, "rank")),
                                       logical(f.g, ("layers", "rank")), logical(f.tau, ("layers",)))
            past[site] = PastBottlenecks(
                logical(jnp.zeros((num_layers, num_tasks, self.r_max, d_in)), ("layers", "tasks", "rank", i)),
                logical(jnp.zeros((num_layers, num_tasks, d_out, self.r_max)), ("layers", "tasks", o, "rank")),
                logical(jnp.zeros((num_layers, num_tasks, self.r_max)), ("layers", "tasks", "rank")))
            if self.hard_projection:
                basis[site] = logical(jnp.zeros((num_layers, d_out, num_tasks * self.r_max)), ("layers", o, None))
        return MethodState(current, OAFixed(past, basis))

    def begin_task(self, key, state, task):
        params = state.params
        if task.index:
            params = self._fresh(key, {s: (c.w1.shape[0], c.w1.shape[2], c.w2.shape[1]) for s, c in params.items()})
        fixed = state.fixed
        if self.hard_projection:
            # Orthonormal basis of the past active W2 columns per site and layer; zero columns (empty
            # slots, switched-off dimensions) come out zero and project nothing.
            basis = {site: jax.vmap(lambda w2, g: orthogonal.gram_schmidt(bottleneck.active_columns(w2, g)))(
                p.w2, p.gamma) for site, p in fixed.past.items()}
            fixed = fixed._replace(basis=basis)
        return self._project(MethodState(params, fixed))

    def end_task(self, state, task):
        past = {}
        for site, cur in state.params.items():
            stored = PastBottlenecks(cur.w1, cur.w2, self.gates(cur))
            past[site] = jax.tree.map(lambda p, c: p.at[:, task.index].set(c), state.fixed.past[site], stored)
        # The finished adapter now lives in its slot; the current one is zeroed (w2 = 0 and γ = 0 add
        # nothing) until the next begin_task draws a fresh one.
        return MethodState(jax.tree.map(jnp.zeros_like, state.params), state.fixed._replace(past=past))

    # -- training hooks --------------------------------------------------------------------------
    def extra_loss(self, model, state, batch, step):
        del model, batch, step
        loss = jnp.zeros((), jnp.float32)
        for site, cur in state.params.items():
            past = state.fixed.past[site]
            if self.lambda_orth and self.orthogonal_to in ("output", "both"):
                per_layer = jax.vmap(bottleneck.orthogonality_penalty)(past.w2, past.gamma, cur.w2)
                loss = loss + self.lambda_orth * jnp.sum(per_layer)
            if self.lambda_orth and self.orthogonal_to in ("input", "both"):  # W1 rows as columns
                per_layer = jax.vmap(bottleneck.orthogonality_penalty)(
                    jnp.swapaxes(past.w1, -1, -2), past.gamma, jnp.swapaxes(cur.w1, -1, -2))
                loss = loss + self.lambda_orth * jnp.sum(per_layer)
            if self.l1:
                loss = loss + self.l1 * jnp.sum(jnp.abs(self.gates(cur)))
        return loss

    def post_update(self, state, step):
        del step
        params = {site: cur._replace(tau=jnp.maximum(cur.tau, 0.0)) for site, cur in state.params.items()}
        return self._project(state._replace(params=params))

    def _project(self, state):
        if not self.hard_projection:
            return state
        params = {site: cur._replace(w2=jax.vmap(orthogonal.project_out)(cur.w2, state.fixed.basis[site]))
                  for site, cur in state.params.items()}
        return state._replace(params=params)

    # -- the site hook ---------------------------------------------------------------------------
    def adapter(self, state, ctx, key=None):
        del ctx  # every task's adapter is summed; there is no routing
        params = {}
        keys = None if key is None or self.dropout == 0 else jax.random.split(key, len(state.params))
        for i, site in enumerate(sorted(state.params)):
            cur = state.params[site]
            p = {"w1": cur.w1, "w2": cur.w2, "gamma": self.gates(cur), "past": state.fixed.past[site]}
            if keys is not None:
                p["key"] = jax.random.split(keys[i], cur.w1.shape[0])
            params[site] = p
        return Adapter(SiteHook(delta_fn=self._delta), params, None)

    def _delta(self, name: str, p: dict, x: jax.Array, ctx: Any) -> jax.Array:
        del name, ctx
        x = lora_kernel.dropout(p.get("key"), x, self.dropout)
        past = p["past"]
        out = bottleneck.adapter_output(x, p["w1"], p["gamma"], p["w2"])
        out = out + bottleneck.adapter_output(x, past.w1, past.gamma, past.w2)
        return out * jnp.asarray(self.scale, x.dtype)

    # -- results ---------------------------------------------------------------------------------
    def report(self, state):
        """r_eff per task, site and layer, and the adapter parameters actually used vs allocated.

        ``adapter_params_used`` counts W1 rows and W2 columns of active dimensions only,
        Σ r_eff·(d_in + d_out); ``adapter_params_allocated`` counts all r_max of every slot (the
        same as an r=r_max LoRA per task, e.g. O-LoRA's). The gates (g, τ) are not counted.
        """
        r_eff, used, allocated = {}, 0, 0
        for site, past in state.fixed.past.items():
            counts = np.asarray(jnp.sum(past.gamma != 0, axis=-1))   # (L, T)
            width = past.w1.shape[-1] + past.w2.shape[-2]              # d_in + d_out
            r_eff[site] = counts.T.tolist()                            # [task][layer]
            used += int(counts.sum()) * width
            allocated += counts.size * self.r_max * width
        return {"r_max": self.r_max, "r_eff": r_eff, "adapter_params_used": used,
                "adapter_params_allocated": allocated,
                "used_fraction": used / allocated if allocated else 0.0}
