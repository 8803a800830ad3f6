"""IncLoRA: a new LoRA per task, past ones frozen, outputs summed (DESIGN §6)."""
import dataclasses

from jaxcl.methods.lora_bank import LoRABank


@dataclasses.dataclass(frozen=True)
class IncLoRA(LoRABank):
    name = "inc_lora"
