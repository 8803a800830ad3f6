"""L2-LoRA: SeqLoRA pulled towards the LoRA it had when the previous task ended.

Math: docs/l2_lora.md.

One LoRA is trained on task after task, as in SeqLoRA, with ``CE + λ Σ ‖θ − θ_prev‖²`` over its
matrices, ``θ_prev`` being the LoRA at the end of the previous task (no penalty on the first task).
It is the simplest regularisation baseline (an EWC with an identity Fisher), and the example that
adding a method takes one file, its registry line and its tests.

References:
  Kirkpatrick et al., Overcoming catastrophic forgetting in neural networks (EWC), 2017,
  https://arxiv.org/abs/1612.00796 (the L2 variant is its uniform-importance special case).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, final

import jax
import jax.numpy as jnp

from jaxcl.methods.axes import logical
from jaxcl.methods.base import Method, MethodState
from jaxcl.methods.lora_bank import Current, LoRAOptions


class Anchor(NamedTuple):
    """Attributes: ``lora`` the LoRAs at the end of the previous task, ``{site: LoRA}``; ``active``
    () bool, whether there is a previous task."""

    lora: dict
    active: jax.Array


@final
@dataclasses.dataclass(frozen=True)
class L2LoRA(LoRAOptions, Method):
    """Attributes (besides the LoRA options): ``strength`` λ of the pull (1.0)."""

    name = "l2_lora"
    strength: float = 1.0

    def init(self, key, model, num_tasks):
        del num_tasks
        current = self.bank.current(key, model)
        anchor = jax.tree.map(lambda x: logical(jnp.zeros_like(x.value), x.names), current,
                              is_leaf=lambda x: hasattr(x, "names"))
        return MethodState(Current(current), Anchor(anchor, logical(jnp.zeros((), bool), ())))

    def end_task(self, state, task):
        del task
        # a copy: the train step donates the params, so the two must not share buffers
        return state._replace(fixed=Anchor(jax.tree.map(jnp.copy, state.params.lora), jnp.ones((), bool)))

    def adapter(self, state, ctx, key=None):
        del ctx
        return self.bank.adapter(state.params.lora, None, None, key)

    def extra_loss(self, model, state, batch, step):
        del model, batch, step
        pull = sum(jnp.sum(jnp.square(c - a)) for c, a in zip(jax.tree.leaves(state.params.lora),
                                                              jax.tree.leaves(state.fixed.lora)))
        return jnp.where(state.fixed.active, self.strength * pull, 0.0)
