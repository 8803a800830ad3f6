"""MTL: one LoRA trained jointly on the union of all tasks (the usual upper bound).

The engine trains once on the mixed stream and evaluates every task, so results.json holds a single
row; BWT/FWT/forgetting do not apply and are reported as null.
"""
import dataclasses

from jaxcl.methods.lora_bank import LoRABank


@dataclasses.dataclass(frozen=True)
class MTL(LoRABank):
    name = "mtl"
    joint = True
    new_lora_per_task: bool = False
