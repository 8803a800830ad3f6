"""O-LoRA: IncLoRA whose new LoRA is kept orthogonal to the past ones (DESIGN §6).

Loss ``CE + λ1 Σ_sites Σ_layers Σ|A_past A_newᵀ| + λ2 Σ‖new LoRA‖²`` — λ1 as the official code
computes it (elementwise L1 of the product of the stacked past A rows and the new A rows).

``hard_projection=True`` is jaxcl's own option: after every optimizer update (and at the start of a
task) the new A rows are projected out of span(past A rows), so the subspaces are exactly orthogonal
rather than penalised towards it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxcl.kernels import orthogonal
from jaxcl.methods.lora_bank import LoRABank


def _past_rows(past_site: dict) -> jax.Array:
    """(L, T_past, r, d_in) -> (L, T_past * r, d_in)."""
    a = past_site["a"]
    return a.reshape(a.shape[0], a.shape[1] * a.shape[2], a.shape[3])


@dataclasses.dataclass(frozen=True)
class OLoRA(LoRABank):
    name = "olora"
    lambda1: float = 0.5
    lambda2: float = 0.0
    hard_projection: bool = False

    def begin_task(self, key, state, task, site_shapes):
        state = super().begin_task(key, state, task, site_shapes)
        if not self.hard_projection:
            return state
        # Orthonormal basis of the past A rows per site and layer: (L, d_in, T * r); empty slots
        # are zero rows and give zero columns, which project nothing.
        basis = {site: jax.vmap(lambda rows: orthogonal.gram_schmidt(rows.T))(_past_rows(p))
                 for site, p in state["fixed"]["past"].items()}
        return self.post_update({"train": state["train"], "fixed": dict(state["fixed"], basis=basis)})

    def extra_loss(self, state, base):
        del base
        loss = jnp.zeros((), jnp.float32)
        past = state["fixed"]["past"]
        for site, new in state["train"]["lora"].items():
            if self.lambda1:
                per_layer = jax.vmap(orthogonal.olora_penalty)(_past_rows(past[site]), new["a"])
                loss = loss + self.lambda1 * per_layer.sum()
            if self.lambda2:
                loss = loss + self.lambda2 * sum(jnp.sum(v.astype(jnp.float32) ** 2) for v in new.values())
        return loss

    def post_update(self, state):
        basis = state["fixed"].get("basis")
        if not basis:
            return state
        lora = dict(state["train"]["lora"])
        for site, q in basis.items():
            a = lora[site]["a"]  # (L, r, d_in)
            a = jax.vmap(lambda a_l, q_l: orthogonal.project_out(a_l.T, q_l).T)(a, q)
            lora[site] = dict(lora[site], a=a)
        return {"train": dict(state["train"], lora=lora), "fixed": state["fixed"]}

    def end_task(self, state, task):
        state = super().end_task(state, task)
        fixed = {k: v for k, v in state["fixed"].items() if k != "basis"}
        return {"train": state["train"], "fixed": fixed}
