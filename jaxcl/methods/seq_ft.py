"""SeqFT: full fine-tuning of the base model, task after task."""
import dataclasses

from jaxcl.methods.base import Method


@dataclasses.dataclass(frozen=True)
class SeqFT(Method):
    """Trains every base parameter; ``frozen`` lists path substrings to keep fixed (e.g. "embed")."""

    name = "seq_ft"
    frozen: tuple = ()

    def base_trainable(self, path):
        return not any(f in path for f in self.frozen)
