"""SeqLoRA: one LoRA trained on task after task (the forgetting baseline of the LoRA family)."""
import dataclasses

from jaxcl.methods.lora_bank import LoRABank


@dataclasses.dataclass(frozen=True)
class SeqLoRA(LoRABank):
    name = "seq_lora"
    new_lora_per_task: bool = False
