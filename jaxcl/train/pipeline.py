"""The batch pipeline: a task stream becomes fixed-shape, device-placed batches.

``Stream.prepare`` tokenizes every task once (carving the seeded validation split from each
training set) and fixes, for the whole stream, the few padded lengths any batch may have:

  * training rows (decoder: prompt + answer; seq2seq: the source): two lengths, the smallest
    bucket (a multiple of 16) holding half of the stream's rows and the one holding all of them —
    so the train step compiles at most twice, whatever the number of tasks or their lengths;
  * every other batch (validation loss, the batches methods read at ``begin_task``/``end_task``,
    generation prompts): one length each, the longest of the stream.

Everything the loop consumes comes from here: ``train_feed`` (a pure function of
``(seed, phase, step)``, with the method's replay), ``task_batches`` (``TaskInfo.batches``),
``validation_batches`` and ``eval_queue`` (all tasks' test prompts as one queue of fixed-shape
batches, one task per batch).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Optional

import numpy as np

from jaxcl import data as jdata
from jaxcl.data import batching, tokenization
from jaxcl.methods.base import ReplaySpec
from jaxcl.train import sharding as jsharding
from jaxcl.train.config import RunConfig

BUCKET = 16


@dataclasses.dataclass
class PreparedTask:
    name: str
    metric: str
    train: list            # TokenizedExample
    validation: list
    test: list
    test_examples: list    # the test Examples (prompts and references, for predictions)
    golds: list            # per test example, tuple of gold strings


def _round_up(n: int) -> int:
    return BUCKET * math.ceil(max(n, 1) / BUCKET)


@dataclasses.dataclass
class Stream:
    """The tokenized tasks of a run and its fixed batch shapes."""

    cfg: RunConfig
    tasks: list                     # PreparedTask, in training order
    spec: tokenization.BatchSpec
    train_lengths: tuple[int, ...]  # padded lengths of training batches
    row_length: int                 # padded length of validation/task batches
    prompt_length: int              # padded length of generation prompts
    mesh: Any

    @classmethod
    def prepare(cls, cfg: RunConfig, tasks: list, tokenizer, encoder_decoder: bool, mesh) -> "Stream":
        d = cfg.data
        spec = tokenization.make_batch_spec(tokenizer, "seq2seq" if encoder_decoder else "decoder",
                                            d.max_prompt_tokens, d.max_answer_tokens, bucket_multiple=BUCKET)
        prepared = []
        for i, task in enumerate(tasks):
            train = task.train[: d.max_train_per_task] if d.max_train_per_task else task.train
            train, validation = jdata.split_validation(train, fraction=d.validation_fraction, seed=cfg.train.seed + i)
            test = task.test
            if cfg.eval.max_test_per_task and len(test) > cfg.eval.max_test_per_task:
                keep = np.sort(np.random.default_rng([cfg.train.seed, i]).permutation(len(test))[: cfg.eval.max_test_per_task])
                test = [test[j] for j in keep]
            prepared.append(PreparedTask(
                task.name, task.metric,
                tokenization.tokenize_examples(train, tokenizer, spec),
                tokenization.tokenize_examples(validation, tokenizer, spec),
                tokenization.tokenize_examples(test, tokenizer, spec), list(test), [e.golds for e in test]))
        rows = [x for t in prepared for x in t.train + t.validation]
        if encoder_decoder:
            lengths = np.array([len(x.prompt) for x in rows])
        else:
            lengths = np.array([len(x.prompt) + len(x.answer) for x in rows])
        longest = _round_up(int(lengths.max()))
        train_lengths = tuple(sorted({_round_up(int(np.quantile(lengths, 0.5, method="higher"))), longest}))
        prompts = [len(x.prompt) for t in prepared for x in t.test] or [1]
        return cls(cfg, prepared, spec, train_lengths, longest, _round_up(max(prompts)), mesh)

    # -- training -----------------------------------------------------------------------------------
    def replayed_rows(self, replay: Optional[ReplaySpec], past: list[int]) -> int:
        return replay.replayed_rows(self.cfg.train.batch_size) if replay is not None and past else 0

    def phase_steps(self, members: list[int], replay: Optional[ReplaySpec], past: list[int]) -> int:
        """Optimizer steps of a phase: ``train.steps_per_task`` per task, or ``epochs`` over its data,
        an epoch counting the current tasks' rows (a replaying batch holds fewer of them)."""
        t = self.cfg.train
        if t.steps_per_task:
            return t.steps_per_task * len(members)
        n = sum(len(self.tasks[i].train) for i in members)
        rows = t.batch_size - self.replayed_rows(replay, past)
        return max(1, math.ceil(t.epochs * batching.steps_per_epoch(n, rows)))

    def train_feed(self, phase: int, members: list[int], past: list[int],
                   replay: Optional[ReplaySpec]) -> Callable[[int], dict]:
        """``step -> device batch`` (leading ``(grad_accum,)`` axis) for one phase: a pure function of
        (seed, phase, step)."""
        t = self.cfg.train
        train = [x for i in members for x in self.tasks[i].train]
        ids = np.concatenate([np.full(len(self.tasks[i].train), i, np.int32) for i in members])
        memory, memory_ids = [], []
        for i in (past if replay is not None else []):
            keep = batching.memory_indices(len(self.tasks[i].train), replay.per_task, t.seed + i)
            memory += [self.tasks[i].train[k] for k in keep]
            memory_ids += [i] * len(keep)
        ids = np.concatenate([ids, np.asarray(memory_ids, np.int32)])
        seed = t.seed * 1000 + phase

        def batch(step: int) -> dict:
            if memory:
                b = batching.replay_batch(train, memory, t.batch_size, replay.fraction, seed, step, self.spec,
                                          buckets=self.train_lengths)
            else:
                b = batching.train_batch(train, t.batch_size, seed, step, self.spec, buckets=self.train_lengths)
            return self._place_train(b, ids[b.pop("example_index")])
        return batch

    def _place_train(self, b: dict, task_ids: np.ndarray) -> dict:
        """A host training batch as the train step takes it: ``task_ids`` added, a leading
        ``(grad_accum,)`` axis, split over the mesh."""
        b = dict(b, task_ids=task_ids)
        b.pop("position_ids", None)
        b = {k: v.reshape((self.cfg.train.grad_accum, -1) + v.shape[1:]) for k, v in b.items()}
        return jsharding.shard_batch(self.mesh, b, batch_axis=1)

    def train_examples(self) -> list[dict]:
        """One device batch of every training shape (one per ``train_lengths``), to compile for."""
        rows = [x for t in self.tasks for x in t.train] or [x for t in self.tasks for x in t.validation]
        shortest = min(rows, key=lambda x: len(x.prompt) + (len(x.answer) if self.spec.kind == "decoder" else 0))
        size = self.cfg.train.batch_size
        return [self._place_train(batching.collate_train([shortest] * size, np.ones(size, bool), self.spec, (n,)),
                                  np.zeros(size, np.int32)) for n in self.train_lengths]

    # -- batches methods read, validation -----------------------------------------------------------
    def task_batches(self, members: list[int], split: str = "train") -> Iterator[dict]:
        """Every example of ``split`` (train or validation) of the tasks ``members`` once, in order,
        as host batches of ``eval.batch_size`` rows and one length (see ``TaskInfo.batches``)."""
        size = self.cfg.eval.batch_size
        rows = [(i, x) for i in members for x in getattr(self.tasks[i], split)]
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            real = np.arange(size) < len(chunk)
            chunk = chunk + [chunk[-1]] * (size - len(chunk))
            b = batching.collate_train([x for _, x in chunk], real, self.spec, (self.row_length,))
            b.pop("position_ids", None)
            yield dict(b, task_ids=np.array([i for i, _ in chunk], np.int32), real=real)

    def validation_batches(self, index: int) -> Iterator[dict]:
        """Device batches of task ``index``'s validation split (filler rows carry no loss)."""
        for b in self.task_batches([index], "validation"):
            b.pop("real")
            yield jsharding.shard_batch(self.mesh, b)

    # -- evaluation ---------------------------------------------------------------------------------
    def eval_queue(self) -> list[tuple[int, np.ndarray, dict]]:
        """``(task, row indices, host batch)`` over every task's test prompts: fixed-shape batches of
        ``eval.batch_size`` left-padded prompts (seq2seq: right-padded), one task per batch."""
        queue = []
        for j, task in enumerate(self.tasks):
            for indices, b in batching.eval_batches(task.test, self.cfg.eval.batch_size, self.spec, (self.prompt_length,)):
                batch = {k: b[k] for k in ("input_ids", "attention_mask")}
                batch["task_ids"] = np.full(len(b["input_ids"]), j, np.int32)
                queue.append((j, indices, batch))
        return queue
