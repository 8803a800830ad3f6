"""SeqLoRA: one LoRA trained on task after task (the forgetting baseline of the LoRA family).

Math: docs/seq_lora.md.

References:
  Hu et al., LoRA, 2021 (https://arxiv.org/abs/2106.09685); as the sequential baseline in O-LoRA
  (Wang et al., 2023, https://arxiv.org/abs/2310.14152).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, final

from jaxcl.methods.base import Method, MethodState
from jaxcl.methods.lora_bank import Current, LoRAOptions


class NoFixed(NamedTuple):
    """The fixed state of a method that keeps nothing besides what it trains."""


class OneLoRA(LoRAOptions, Method):
    """One LoRA at the bank's sites, trained on whatever the engine feeds it (abstract)."""

    def init(self, key, model, num_tasks):
        del num_tasks
        return MethodState(Current(self.bank.current(key, model)), NoFixed())

    def adapter(self, state, ctx, key=None):
        del ctx
        return self.bank.adapter(state.params.lora, None, None, key)

    def report(self, state):
        return {"lora_params": self.bank.params_per_task(state.params.lora)}


@final
@dataclasses.dataclass(frozen=True)
class SeqLoRA(OneLoRA):
    """One LoRA at ``sites`` (default q and v, r=8, α=32, dropout 0.1), trained on every task in turn."""

    name = "seq_lora"
