"""O-LoRA: IncLoRA whose new LoRA is kept orthogonal to the past ones.

Math: docs/olora.md.

Loss ``CE + λ1 Σ_sites Σ_layers Σ|A_past A_newᵀ| + λ2 Σ‖new LoRA‖²`` — λ1 as the official code
computes it (elementwise L1 of the product of the stacked past A rows and the new A rows,
``kernels.orthogonal.olora_penalty``). After each task the new LoRA joins the past ones (a slot of
the bank, equivalent to O-LoRA's concatenation of A rows and B columns).

``hard_projection=True`` is jaxcl's own option: after every optimizer update (and at the start of a
task) the new A rows are projected out of span(past A rows), so the subspaces are exactly orthogonal
rather than penalised towards it. The orthonormal basis of the past rows, ``(L, d_in, T·r)`` per
site, is then part of the fixed state (recomputed at every ``begin_task``).

References:
  Wang et al., Orthogonal Subspace Learning for Language Model Continual Learning, EMNLP 2023.
  https://arxiv.org/abs/2310.14152 (official code: github.com/cmnfriend/O-LoRA).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, final

import jax
import jax.numpy as jnp

from jaxcl.kernels import orthogonal
from jaxcl.methods.axes import logical
from jaxcl.methods.base import Method, MethodState
from jaxcl.methods.lora_bank import Current, LoRA, LoRAOptions, begin_incremental, finish_incremental


class OLoRAFixed(NamedTuple):
    """Attributes:
      past: the past bank ``{site: LoRA}``.
      basis: ``{site: (L, d_in, T·r)}`` orthonormal basis of the past A rows (hard projection
        only; empty otherwise).
    """

    past: dict
    basis: dict


def _past_rows(past: LoRA) -> jax.Array:
    """(L, T, r, d_in) -> (L, T·r, d_in)."""
    a = past.a
    return a.reshape(a.shape[0], a.shape[1] * a.shape[2], a.shape[3])


@final
@dataclasses.dataclass(frozen=True)
class OLoRA(LoRAOptions, Method):
    """Attributes (besides the LoRA options): ``lambda1`` (orthogonality, 0.5), ``lambda2`` (L2 on
    the new LoRA, 0), ``hard_projection`` (see the module docstring)."""

    name = "olora"
    lambda1: float = 0.5
    lambda2: float = 0.0
    hard_projection: bool = False

    def init(self, key, model, num_tasks):
        past = self.bank.past(model, num_tasks)
        basis = {}
        if self.hard_projection:
            basis = {site: logical(jnp.zeros((l.a.value.shape[0], l.a.value.shape[3], num_tasks * self.rank)),
                                   ("layers", l.a.names[3], None)) for site, l in past.items()}
        return MethodState(Current(self.bank.current(key, model)), OLoRAFixed(past, basis))

    def begin_task(self, key, state, task):
        state = state._replace(params=Current(begin_incremental(self.bank, key, task.index, state.params.lora)))
        if not self.hard_projection:
            return state
        # Empty slots are zero rows and give zero columns, which project nothing.
        basis = {site: jax.vmap(lambda rows: orthogonal.gram_schmidt(rows.T))(_past_rows(p))
                 for site, p in state.fixed.past.items()}
        return self._project(state._replace(fixed=state.fixed._replace(basis=basis)))

    def end_task(self, state, task):
        past, current = finish_incremental(state.fixed.past, state.params.lora, task.index)
        return MethodState(Current(current), state.fixed._replace(past=past))

    def adapter(self, state, ctx, key=None):
        del ctx
        return self.bank.adapter(state.params.lora, state.fixed.past, None, key)

    def extra_loss(self, model, state, batch, step):
        del model, batch, step
        loss = jnp.zeros((), jnp.float32)
        for site, new in state.params.lora.items():
            if self.lambda1:
                per_layer = jax.vmap(orthogonal.olora_penalty)(_past_rows(state.fixed.past[site]), new.a)
                loss = loss + self.lambda1 * per_layer.sum()
            if self.lambda2:
                loss = loss + self.lambda2 * sum(jnp.sum(jnp.square(v.astype(jnp.float32))) for v in new)
        return loss

    def post_update(self, state, step):
        del step
        return self._project(state) if self.hard_projection else state

    def _project(self, state):
        lora = {}
        for site, cur in state.params.lora.items():
            q = state.fixed.basis[site]
            a = jax.vmap(lambda a_l, q_l: orthogonal.project_out(a_l.T, q_l).T)(cur.a, q)
            lora[site] = cur._replace(a=a)
        return state._replace(params=Current(lora))

    def report(self, state):
        return {"lora_params_per_task": self.bank.params_per_task(state.params.lora)}
