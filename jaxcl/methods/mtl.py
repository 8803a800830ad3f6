"""MTL: one LoRA trained jointly on the union of all tasks (the usual upper bound).

Math: docs/mtl.md.

The engine trains once on the mixed stream and evaluates every task, so results.json holds a single
row; BWT/FWT/forgetting do not apply and are reported as null.
"""
from __future__ import annotations

import dataclasses
from typing import final

from jaxcl.methods.seq_lora import OneLoRA


@final
@dataclasses.dataclass(frozen=True)
class MTL(OneLoRA):
    name = "mtl"
    joint = True
