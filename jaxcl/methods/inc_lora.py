"""IncLoRA: a new LoRA per task, past ones frozen, every adapter's output summed.

Math: docs/inc_lora.md.

References:
  The incremental LoRA baseline of O-LoRA (Wang et al., 2023, https://arxiv.org/abs/2310.14152).
"""
from __future__ import annotations

import dataclasses
from typing import final

from jaxcl.methods.lora_bank import IncrementalLoRA


@final
@dataclasses.dataclass(frozen=True)
class IncLoRA(IncrementalLoRA):
    name = "inc_lora"

    def adapter(self, state, ctx, key=None):
        del ctx
        return self.bank.adapter(state.params.lora, state.fixed.past, None, key)
