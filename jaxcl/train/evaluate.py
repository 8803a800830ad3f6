"""Evaluation: every task's test prompts as one queue through one compiled generation program.

All batches of the queue are dispatched before any result is read back, so the device generates
batch after batch without waiting for the host, and each batch stops as soon as every one of its
rows has produced an end-of-sequence id (``generate_ids``' while loop, no host round trip per
token). Routing methods also run their router over the same batches.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Optional

import jax
import numpy as np

from jaxcl.data import scoring
from jaxcl.methods.base import Method, StepContext
from jaxcl.methods.seq_ft import BaseModel
from jaxcl.train import sharding as jsharding, step as jstep
from jaxcl.train.compilation import Program
from jaxcl.train.pipeline import Stream


@dataclasses.dataclass
class Evaluation:
    """Attributes:
      scores: per task, the score in % of its test set.
      routing: per task, the % of its prompts a routing method sent to it (None otherwise).
      predictions: per test prompt, ``{"task", "index", "prompt", "prediction", "references", "score"}``.
      seconds: wall time of the evaluation.
    """

    scores: list
    routing: Optional[list]
    predictions: list
    seconds: float


class Evaluator:
    """The jitted evaluation programs of one run."""

    def __init__(self, stream: Stream, graphdef, frozen_base: dict, method: Method, tokenizer, eos_ids: tuple):
        self.stream, self.frozen_base, self.method, self.tokenizer = stream, frozen_base, method, tokenizer
        self.eos_ids = eos_ids
        cfg = stream.cfg
        # Outputs are replicated so that every host can read them back.
        whole = jsharding.replicated(stream.mesh)
        gen = functools.partial(jstep.generate_step, graphdef=graphdef, max_new_tokens=cfg.eval.max_new_tokens,
                                eos_token_id=eos_ids)
        self._generate = {m: Program(jax.jit(functools.partial(gen, method=m), out_shardings=whole))
                          for m in (method, BaseModel())}
        self._route = Program(jax.jit(functools.partial(jstep.route_step, graphdef=graphdef, method=method),
                                      out_shardings=whole)) if method.routes else None
        self._nll = Program(jax.jit(functools.partial(jstep.eval_nll, graphdef=graphdef, method=method,
                                                      max_targets=stream.spec.max_answer_len), out_shardings=whole))

    @property
    def programs(self) -> list[Program]:
        return [*self._generate.values(), self._nll] + ([self._route] if self._route is not None else [])

    def compile_ahead(self, params: dict, fixed: Any, base_params: dict, base_fixed: Any, ctx: StepContext) -> None:
        """Start compiling every evaluation program for the stream's shapes (``compilation.Program``):
        ``params``/``fixed`` (and ``base_*``, the base row's) as the evaluation will place them."""
        queue = self.stream.eval_queue()
        if queue:
            prompts = jsharding.shard_batch(self.stream.mesh, queue[0][2])
            self._generate[BaseModel()].ahead(base_params, self.frozen_base, base_fixed, prompts)
            self._generate[self.method].ahead(params, self.frozen_base, fixed, prompts)
            if self._route is not None:
                self._route.ahead(params, self.frozen_base, fixed, prompts)
        held_out = next((i for i, t in enumerate(self.stream.tasks) if t.validation), None)
        if held_out is not None:
            self._nll.ahead(params, self.frozen_base, fixed, next(self.stream.validation_batches(held_out)), ctx)

    def evaluate(self, method: Method, params: dict, fixed: Any) -> Evaluation:
        """Score every task (``method`` is the run's method, or ``BaseModel()`` for the base row);
        ``params`` and ``fixed`` placed on the mesh."""
        start = time.time()
        generate = self._generate[method]
        route = self._route if method is self.method else None
        queue = self.stream.eval_queue()
        pending = []
        for task, indices, batch in queue:  # dispatch everything, then read
            b = jsharding.shard_batch(self.stream.mesh, batch)
            out = generate(params, self.frozen_base, fixed, b)
            picked = None if route is None else route(params, self.frozen_base, fixed, b)
            pending.append((task, indices, out, picked))
        texts = [[] for _ in self.stream.tasks]
        hits = [[] for _ in self.stream.tasks]
        for task, indices, out, picked in pending:
            for row in np.asarray(out)[: len(indices)]:
                texts[task].append(scoring.extract_answer(self.tokenizer.decode(self._until_eos(row), skip_special_tokens=True)))
            if picked is not None:
                hits[task].extend(np.asarray(picked)[: len(indices)] == task)
        scores, predictions = [], []
        for j, task in enumerate(self.stream.tasks):
            scores.append(float(scoring.score(task.metric, texts[j], task.golds)))
            for i, (pred, golds, example) in enumerate(zip(texts[j], task.golds, task.test_examples)):
                predictions.append({"task": task.name, "index": i, "prompt": example.prompt, "prediction": pred,
                                    "references": list(golds), "score": float(scoring.score(task.metric, [pred], [golds]))})
        routing = [100.0 * float(np.mean(h)) for h in hits] if route is not None else None
        return Evaluation(scores, routing, predictions, time.time() - start)

    def _until_eos(self, row: np.ndarray) -> list:
        ended = np.flatnonzero(np.isin(row, self.eos_ids))
        return list(row[: ended[0]] if ended.size else row)

    def validation_loss(self, params: dict, fixed: Any, index: int, ctx: StepContext) -> Optional[float]:
        """Mean answer-token cross-entropy on task ``index``'s validation split (carved from train)."""
        if not self.stream.tasks[index].validation:
            return None
        sums = [self._nll(params, self.frozen_base, fixed, b, ctx) for b in self.stream.validation_batches(index)]
        total = sum(float(nll) for nll, _ in sums)
        count = sum(float(n) for _, n in sums)
        return total / max(count, 1.0)
