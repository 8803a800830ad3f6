"""OA-Adapter: budget-adaptive bottleneck adapters in orthogonal subspaces (DESIGN §6).

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
  - τ is one scalar per (task, site, layer): the budget of a site-layer moves as one, and a
    dimension switched off (no gradient through the flat part of the threshold) can come back on
    when τ falls below its |g|.
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

State:
  ``train["adapter"][site]``: ``{"w1": (L, r, d_in), "w2": (L, d_out, r), "g": (L, r), "tau": (L,)}``
  ``fixed["past"][site]``: ``{"w1": (L, T, r, d_in), "w2": (L, T, d_out, r), "gamma": (L, T, r)}`` —
  the stored γ is exactly zero off the active set, so the active mask is ``gamma != 0``.
  ``fixed["basis"][site]`` ``(L, d_out, T·r)`` only while a task trains with ``hard_projection``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.kernels import lora as lora_kernel
from jaxcl.kernels import orthogonal
from jaxcl.methods.base import Method, TaskInfo
from jaxcl.methods.lora_bank import select_sites
from jaxcl.models.sites import Adapter, SiteHook


def soft_threshold(g: jax.Array, tau: jax.Array) -> jax.Array:
    """``sign(g) · max(|g| − τ, 0)``: exact zeros where ``|g| ≤ τ``; τ broadcasts against g."""
    return jnp.sign(g) * jax.nn.relu(jnp.abs(g) - tau)


def orthogonality_penalty(past_w2: jax.Array, past_gamma: jax.Array, w2: jax.Array) -> jax.Array:
    """``Σ_s ‖W2_s[:, active_s]ᵀ W2‖_F²`` at one site and layer.

    Args:
      past_w2: ``(T, d_out, r)`` past tasks' W2 (empty slots are zero).
      past_gamma: ``(T, r)`` their gates; a column is active where its gate is non-zero.
      w2: ``(d_out, r)`` the current task's W2.

    Returns:
      scalar.
    """
    active = (past_gamma != 0).astype(w2.dtype)
    overlap = jnp.einsum("tos,or->tsr", past_w2.astype(w2.dtype), w2) * active[:, :, None]
    return jnp.sum(overlap ** 2)


def past_active_columns(past: dict) -> jax.Array:
    """``(L, d_out, T·r)``: every past W2 column, zeroed where its task switched it off."""
    w2 = past["w2"] * (past["gamma"] != 0).astype(past["w2"].dtype)[:, :, None, :]
    num_layers, tasks, d_out, rank = w2.shape
    return jnp.transpose(w2, (0, 2, 1, 3)).reshape(num_layers, d_out, tasks * rank)


@dataclasses.dataclass(frozen=True)
class OAAdapter(Method):
    """Attributes: see the module docstring for the reasoning behind each default.

    sites: site-name suffixes to adapt (see ``lora_bank.select_sites``).
    r_max: allocated bottleneck width per task, site and layer.
    dropout: dropout rate on the adapter input (training only).
    lambda_orth: weight of the orthogonality penalty.
    l1: weight of the L1 penalty on the current task's gates γ.
    g_init, tau_init: initial gate value (every dimension) and threshold.
    scale: output scale s of the adapter (O-LoRA's α/r).
    gate_lr_multiplier: how much faster (under Adam) g and τ train than W1 and W2.
    hard_projection: keep W2_t exactly orthogonal to past active columns after every update.
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

    def __post_init__(self):
        if self.r_max < 1:
            raise ValueError(f"r_max must be >= 1, got {self.r_max}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.gate_lr_multiplier > 0:
            raise ValueError(f"gate_lr_multiplier must be > 0, got {self.gate_lr_multiplier}")

    # -- state -----------------------------------------------------------------------------------
    def fresh(self, key: jax.Array, site_shapes: dict) -> dict:
        """New adapters for the task about to train: ``{site: {"w1", "w2", "g", "tau"}}``."""
        sites = select_sites(site_shapes, self.sites)
        out = {}
        for site, k in zip(sites, jax.random.split(key, len(sites))):
            num_layers, d_in, d_out = site_shapes[site]
            pair = jax.vmap(lambda kk: lora_kernel.init(kk, d_in, d_out, self.r_max))(jax.random.split(k, num_layers))
            out[site] = {"w1": pair["a"], "w2": pair["b"],
                         "g": jnp.full((num_layers, self.r_max), self.g_init / self.gate_lr_multiplier, jnp.float32),
                         "tau": jnp.full((num_layers,), self.tau_init / self.gate_lr_multiplier, jnp.float32)}
        return out

    def gates(self, current: dict) -> jax.Array:
        """γ ``(L, r)`` of one site's current adapter (the stored g and τ are in 1/multiplier units)."""
        k = self.gate_lr_multiplier
        return soft_threshold(k * current["g"], k * current["tau"][:, None])

    def init(self, key, site_shapes, num_tasks):
        current = self.fresh(key, site_shapes)
        past = {site: {"w1": jnp.zeros((p["w1"].shape[0], num_tasks) + p["w1"].shape[1:], jnp.float32),
                       "w2": jnp.zeros((p["w2"].shape[0], num_tasks) + p["w2"].shape[1:], jnp.float32),
                       "gamma": jnp.zeros((p["g"].shape[0], num_tasks, self.r_max), jnp.float32)}
                for site, p in current.items()}
        return {"train": {"adapter": current}, "fixed": {"past": past}}

    def begin_task(self, key, state, task: TaskInfo, site_shapes):
        train = state["train"] if task.index == 0 else {"adapter": self.fresh(key, site_shapes)}
        fixed = state["fixed"]
        if self.hard_projection:
            # Orthonormal basis of the past active W2 columns per site and layer; zero columns (empty
            # slots, switched-off dimensions) come out zero and project nothing.
            basis = {site: jax.vmap(orthogonal.gram_schmidt)(past_active_columns(p)) for site, p in fixed["past"].items()}
            fixed = dict(fixed, basis=basis)
        return self.post_update({"train": train, "fixed": fixed})

    def end_task(self, state, task):
        past = dict(state["fixed"]["past"])
        for site, cur in state["train"]["adapter"].items():
            stored = {"w1": cur["w1"], "w2": cur["w2"], "gamma": self.gates(cur)}
            past[site] = jax.tree.map(lambda p, c: p.at[:, task.index].set(c), past[site], stored)
        # The finished adapter now lives in its slot; the current one is zeroed (w2 = 0 and γ = 0 add
        # nothing) until the next begin_task draws a fresh one.
        train = {"adapter": jax.tree.map(jnp.zeros_like, state["train"]["adapter"])}
        fixed = {k: v for k, v in state["fixed"].items() if k != "basis"}
        return {"train": train, "fixed": dict(fixed, past=past)}

    # -- training hooks --------------------------------------------------------------------------
    def extra_loss(self, state, base):
        del base
        loss = jnp.zeros((), jnp.float32)
        for site, cur in state["train"]["adapter"].items():
            past = state["fixed"]["past"][site]
            if self.lambda_orth:
                per_layer = jax.vmap(orthogonality_penalty)(past["w2"], past["gamma"], cur["w2"])
                loss = loss + self.lambda_orth * jnp.sum(per_layer)
            if self.l1:
                loss = loss + self.l1 * jnp.sum(jnp.abs(self.gates(cur)))
        return loss

    def post_update(self, state):
        basis = state["fixed"].get("basis")
        if not basis:
            return state
        adapters = dict(state["train"]["adapter"])
        for site, q in basis.items():
            w2 = jax.vmap(orthogonal.project_out)(adapters[site]["w2"], q)
            adapters[site] = dict(adapters[site], w2=w2)
        return {"train": dict(state["train"], adapter=adapters), "fixed": state["fixed"]}

    # -- the site hook ---------------------------------------------------------------------------
    @property
    def hook(self) -> SiteHook:
        return SiteHook(delta_fn=self._delta)

    def adapter(self, state, ctx, key=None):
        params = {}
        sites = sorted(state["train"]["adapter"])
        keys = None if key is None or self.dropout == 0 else jax.random.split(key, len(sites))
        for i, site in enumerate(sites):
            cur = state["train"]["adapter"][site]
            p = {"w1": cur["w1"], "w2": cur["w2"], "gamma": self.gates(cur), "past": state["fixed"]["past"][site]}
            if keys is not None:
                p["key"] = jax.random.split(keys[i], cur["w1"].shape[0])
            params[site] = p
        return Adapter(self.hook, params, ctx)

    def _delta(self, name: str, p: dict, x: jax.Array, ctx: Any) -> jax.Array:
        del name, ctx  # every task's adapter is summed; there is no routing
        if "key" in p:
            keep = jax.random.bernoulli(p["key"], 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        h = (x @ p["w1"].astype(x.dtype).T) * p["gamma"].astype(x.dtype)
        out = h @ p["w2"].astype(x.dtype).T
        past = p["past"]
        h_past = jnp.einsum("...d,trd->...tr", x, past["w1"].astype(x.dtype)) * past["gamma"].astype(x.dtype)
        out = out + jnp.einsum("...tr,tor->...o", h_past, past["w2"].astype(x.dtype))
        return out * jnp.asarray(self.scale, x.dtype)

    # -- results ---------------------------------------------------------------------------------
    def report(self, state):
        """r_eff per task, site and layer, and the adapter parameters actually used vs allocated.

        ``adapter_params_used`` counts W1 rows and W2 columns of active dimensions only,
        Σ r_eff·(d_in + d_out); ``adapter_params_allocated`` counts all r_max of every slot (the
        same as an r=r_max LoRA per task, e.g. O-LoRA's). The gates (g, τ) are not counted.
        """
        r_eff, used, allocated = {}, 0, 0
        for site, past in state["fixed"]["past"].items():
            counts = np.asarray(jnp.sum(past["gamma"] != 0, axis=-1))  # (L, T)
            width = past["w1"].shape[-1] + past["w2"].shape[-2]        # d_in + d_out
            r_eff[site] = counts.T.tolist()                            # [task][layer]
            used += int(counts.sum()) * width
            allocated += counts.size * self.r_max * width
        return {"r_max": self.r_max, "r_eff": r_eff, "adapter_params_used": used,
                "adapter_params_allocated": allocated,
                "used_fraction": used / allocated if allocated else 0.0}
