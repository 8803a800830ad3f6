"""The plain task representation every reader produces, and the seeded validation split."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

METRICS = ("em", "accuracy", "rouge_l", "edit_sim")


class DataError(ValueError):
    """Benchmark data, an order or a data argument is not what jaxcl expects.

    The message names the file (and line or example index) and what was expected.
    """


class DataWarning(UserWarning):
    """A published benchmark file holds examples jaxcl leaves out (the message names the file and count)."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt/answer pair.

    Attributes:
      prompt: the full model input text (instruction, options, input and the answer cue).
      answer: the training target (for several gold outputs, the first one).
      references: every acceptable gold output, for scoring; empty means ``(answer,)``.
    """

    prompt: str
    answer: str
    references: tuple[str, ...] = ()

    @property
    def golds(self) -> tuple[str, ...]:
        """The gold outputs a prediction is scored against."""
        return self.references or (self.answer,)


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a continual-learning stream.

    Attributes:
      name: the task's name as used in orders and results.
      train: training examples (the validation split is carved from these).
      test: test examples, reported at evaluation points only.
      labels: the verbaliser list for classification tasks, None for open-ended ones.
      metric: one of ``METRICS``.
    """

    name: str
    train: list[Example]
    test: list[Example]
    labels: list[str] | None
    metric: str

    def __post_init__(self):
        if self.metric not in METRICS:
            raise DataError(f"task {self.name!r}: unknown metric {self.metric!r}; known: {list(METRICS)}")


def split_validation(
    examples: Sequence[Example],
    *,
    fraction: float | None = None,
    count: int | None = None,
    seed: int = 0,
) -> tuple[list[Example], list[Example]]:
    """Carves a seeded validation split out of a training set.

    The official CL_Benchmark ``dev.json`` equals ``test.json``, so model selection must never use
    it; this split is the only held-out data seen during training. Both parts keep the original
    relative order, and the result depends only on ``(len(examples), fraction | count, seed)``.

    Args:
      examples: the training examples.
      fraction: share of examples to hold out, in [0, 1).
      count: number of examples to hold out (exactly one of ``fraction`` / ``count``).
      seed: seed of the permutation that picks the held-out examples.

    Returns:
      ``(train, validation)`` lists; ``train`` keeps at least one example.
    """
    if (fraction is None) == (count is None):
        raise DataError("split_validation: pass exactly one of fraction= or count=")
    n = len(examples)
    if fraction is not None:
        if not 0.0 <= fraction < 1.0:
            raise DataError(f"split_validation: fraction must be in [0, 1), got {fraction}")
        count = int(round(fraction * n))
    if not 0 <= count < max(n, 1):
        raise DataError(f"split_validation: count must be in [0, {n - 1}] for {n} examples, got {count}")
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(seed).permutation(n)[:count]] = True
    train = [e for e, h in zip(examples, held) if not h]
    validation = [e for e, h in zip(examples, held) if h]
    return train, validation
