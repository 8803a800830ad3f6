"""SeqFT: full fine-tuning of the base model, task after task (and the identity method).

Math: docs/seq_ft.md.
"""
from __future__ import annotations

import dataclasses
from typing import final

from jaxcl.methods.base import Method, MethodState
from jaxcl.methods.seq_lora import NoFixed


@final
@dataclasses.dataclass(frozen=True)
class SeqFT(Method):
    """Trains every base parameter; ``frozen`` lists path substrings to keep fixed (e.g. "embed")."""

    name = "seq_ft"
    frozen: tuple = ()

    def init(self, key, model, num_tasks):
        del key, model, num_tasks
        return MethodState(NoFixed(), NoFixed())

    def base_trainable(self, path):
        return not any(f in path for f in self.frozen)

    def adapter(self, state, ctx, key=None):
        del state, ctx, key
        return None


@final
@dataclasses.dataclass(frozen=True)
class BaseModel(Method):
    """The identity method: nothing trained, the base model as is (the engine's "before any task" row)."""

    name = "base"

    def init(self, key, model, num_tasks):
        del key, model, num_tasks
        return MethodState(NoFixed(), NoFixed())

    def adapter(self, state, ctx, key=None):
        del state, ctx, key
        return None
