"""Padded, length-bucketed batches and a stateless training sampler (numpy only).

Shapes: every batch has exactly ``batch_size`` rows, and its length is the smallest bucket (a
multiple of ``spec.bucket_multiple``, or the budget itself) that fits its longest row, so a jitted
step compiles for only a handful of shapes. Rows that only fill up a batch ("filler" rows, at the
end of an epoch or of an evaluation set) repeat a real row and have an all-zero ``loss_mask``.

Training batches (``train_batch``) are a pure function of ``(seed, step)``: epoch
``step // steps_per_epoch`` uses its own seeded permutation, sorted by length within chunks of
``chunk_batches`` batches, cut into batches, and the batch order shuffled. A resumed run therefore
sees exactly the batches of an uninterrupted one, and each epoch covers every example once.

Batch keys, decoder-only (``spec.kind == "decoder"``), all int32 except ``loss_mask`` (float32):
  - ``input_ids`` [B, L]: prompt + answer + EOS, right-padded (training) or prompt only,
    left-padded (evaluation).
  - ``attention_mask`` [B, L]: 1 on tokens, 0 on padding.
  - ``position_ids`` [B, L]: 0, 1, ... from each row's first token (0 on left padding).
  - ``loss_mask`` [B, L] (training only): 1 where token t is an answer or EOS token; the logits at
    position t - 1 predict it.
Encoder-decoder (``"seq2seq"``), both padded on the right:
  - ``input_ids``, ``attention_mask`` [B, S]: the source.
  - ``labels`` [B, T] (training only): answer + EOS, padded with ``pad_id``.
  - ``decoder_input_ids`` [B, T]: ``labels`` shifted right behind ``decoder_start_id``.
  - ``decoder_mask`` [B, T]: 1 on target positions (answer + EOS), for the decoder's attention.
  - ``loss_mask`` [B, T] (float32): ``decoder_mask`` with filler rows zeroed; aligned with ``labels``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from jaxcl.data.task import DataError
from jaxcl.data.tokenization import BatchSpec, TokenizedExample

_EPOCH_STREAM, _REPLAY_STREAM, _MEMORY_STREAM = 0, 1, 2  # independent seeded streams


def bucket_lengths(limit: int, multiple: int) -> tuple[int, ...]:
    """The allowed padded lengths: multiples of ``multiple`` below ``limit``, then ``limit``."""
    return tuple(range(multiple, limit, multiple)) + (limit,)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` tokens."""
    for bucket in buckets:
        if bucket >= length:
            return bucket
    raise DataError(f"a row of {length} tokens exceeds the largest bucket {buckets[-1]}")


def train_buckets(spec: BatchSpec) -> tuple[int, ...]:
    """Padded lengths of training rows (decoder: whole sequence; seq2seq: the source)."""
    limit = spec.max_prompt_len + spec.max_answer_len if spec.kind == "decoder" else spec.max_prompt_len
    return bucket_lengths(limit, spec.bucket_multiple)


def pad_rows(rows: Sequence[Sequence[int]], length: int, pad_id: int, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Stacks 1-D rows into int32 ``(ids [B, length], mask [B, length])``, padded on the right or left."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for b, row in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        ids[b, span] = row
        mask[b, span] = 1
    return ids, mask


def collate_train(rows: Sequence[TokenizedExample], real: np.ndarray, spec: BatchSpec,
                  buckets: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """A training batch from tokenized rows; ``real`` [B] bool is False on filler rows.

    ``buckets``: the padded lengths allowed (decoder: whole rows; seq2seq: sources), by default
    ``train_buckets(spec)``; a run fixes a few for its whole stream so its step compiles once each.
    """
    weight = np.asarray(real, np.float32)[:, None]
    buckets = train_buckets(spec) if buckets is None else buckets
    if spec.kind == "decoder":
        seqs = [np.concatenate([r.prompt, r.answer]) for r in rows]
        length = bucket_for(max(len(s) for s in seqs), buckets)
        input_ids, attention_mask = pad_rows(seqs, length, spec.pad_id)
        answer_flags = [np.repeat(np.int32([0, 1]), [len(r.prompt), len(r.answer)]) for r in rows]
        loss_mask = pad_rows(answer_flags, length, 0)[0].astype(np.float32) * weight
        position_ids = np.broadcast_to(np.arange(length, dtype=np.int32), (len(rows), length)).copy()
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "loss_mask": loss_mask,
        }
    source_len = bucket_for(max(len(r.prompt) for r in rows), buckets)
    target_len = spec.max_answer_len  # one decoder length per run: answers are short
    input_ids, attention_mask = pad_rows([r.prompt for r in rows], source_len, spec.pad_id)
    labels, decoder_mask = pad_rows([r.answer for r in rows], target_len, spec.pad_id)
    start = np.full((len(rows), 1), spec.decoder_start_id, np.int32)
    decoder_input_ids = np.concatenate([start, labels[:, :-1]], axis=1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
        "decoder_mask": decoder_mask,
        "loss_mask": decoder_mask.astype(np.float32) * weight,
    }


def collate_eval(rows: Sequence[TokenizedExample], spec: BatchSpec,
                 buckets: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """A generation batch of prompts: left-padded for decoder-only, right-padded for seq2seq
    (``buckets``: the padded lengths allowed, by default every multiple of ``spec.bucket_multiple``)."""
    buckets = bucket_lengths(spec.max_prompt_len, spec.bucket_multiple) if buckets is None else buckets
    length = bucket_for(max(len(r.prompt) for r in rows), buckets)
    left = spec.kind == "decoder"
    input_ids, attention_mask = pad_rows([r.prompt for r in rows], length, spec.pad_id, left=left)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if left:
        batch["position_ids"] = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int32)
    return batch


def eval_batches(
    tokenized: Sequence[TokenizedExample], batch_size: int, spec: BatchSpec, buckets: Sequence[int] | None = None
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yields ``(indices, batch)`` over ``tokenized`` in its original order.

    ``indices`` [n <= batch_size] are the positions of the batch's first n (real) rows; the last
    batch is filled up to ``batch_size`` by repeating its last row.
    """
    if batch_size < 1:
        raise DataError(f"eval batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(tokenized), batch_size):
        indices = np.arange(start, min(start + batch_size, len(tokenized)))
        rows = [tokenized[i] for i in indices] + [tokenized[indices[-1]]] * (batch_size - len(indices))
        yield indices, collate_eval(rows, spec, buckets)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch: every example once, the last batch completed with filler rows."""
    return -(-num_examples // batch_size)


def epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, chunk_batches: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """The batches of one epoch as example indices.

    Args:
      lengths: [N] token length of each example (the sort key of the length bucketing).
      batch_size: rows per batch.
      seed: run seed.
      epoch: epoch number; each epoch has its own permutation.
      chunk_batches: examples are sorted by length within chunks of this many batches, which keeps
        batches similar in length while the order stays random.

    Returns:
      ``(indices, real)``, both [steps_per_epoch, batch_size]; ``real`` is False on filler rows.
    """
    n = len(lengths)
    if n == 0 or batch_size < 1:
        raise DataError(f"cannot batch {n} examples with batch_size {batch_size}")
    rng = np.random.default_rng([seed, _EPOCH_STREAM, epoch])
    order = rng.permutation(n)
    lengths = np.asarray(lengths)
    chunk = chunk_batches * batch_size
    order = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in np.split(order, range(chunk, n, chunk))])
    steps = steps_per_epoch(n, batch_size)
    last = order[(steps - 1) * batch_size :]
    filler = last[np.arange(steps * batch_size - n) % len(last)]
    indices = np.concatenate([order, filler]).reshape(steps, batch_size)
    real = (np.arange(steps * batch_size) < n).reshape(steps, batch_size)
    shuffle = rng.permutation(steps)
    return indices[shuffle], real[shuffle]


def train_indices(
    lengths: Sequence[int], batch_size: int, seed: int, step: int, chunk_batches: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """Example indices [B] and real-row flags [B] of training step ``step`` (0-based)."""
    epoch, position = divmod(step, steps_per_epoch(len(lengths), batch_size))
    indices, real = epoch_batches(lengths, batch_size, seed, epoch, chunk_batches)
    return indices[position], real[position]


def _lengths(tokenized: Sequence[TokenizedExample]) -> list[int]:
    return [len(t.prompt) + len(t.answer) for t in tokenized]


def train_batch(
    tokenized: Sequence[TokenizedExample],
    batch_size: int,
    seed: int,
    step: int,
    spec: BatchSpec,
    chunk_batches: int = 50,
    buckets: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """The training batch of step ``step``: a pure function of ``(tokenized, seed, step)``.

    Besides the arrays of :func:`collate_train`, ``example_index`` [B] (int32) says which example of
    ``tokenized`` each row holds (callers map it to per-example facts such as the task id).
    """
    indices, real = train_indices(_lengths(tokenized), batch_size, seed, step, chunk_batches)
    batch = collate_train([tokenized[i] for i in indices], real, spec, buckets)
    return dict(batch, example_index=np.asarray(indices, np.int32))


def memory_indices(num_examples: int, count: int, seed: int) -> np.ndarray:
    """A seeded choice of ``min(count, num_examples)`` distinct examples to keep for replay, sorted."""
    rng = np.random.default_rng([seed, _MEMORY_STREAM, num_examples])
    return np.sort(rng.permutation(num_examples)[: min(count, num_examples)])


def replay_batch(
    current: Sequence[TokenizedExample],
    memory: Sequence[TokenizedExample],
    batch_size: int,
    replay_fraction: float,
    seed: int,
    step: int,
    spec: BatchSpec,
    chunk_batches: int = 50,
    buckets: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """A training batch mixing the current task with examples replayed from a memory.

    ``round(batch_size * replay_fraction)`` rows (none when the memory is empty) are drawn
    uniformly from ``memory`` by a generator seeded with ``(seed, step)``; the other rows are the
    current task's step-``step`` batch of :func:`train_batch` at that smaller batch size (so one
    current-task epoch takes ``steps_per_epoch(len(current), batch_size - replayed)`` steps).
    Pure in ``(seed, step)`` like :func:`train_batch`. ``example_index`` [B] indexes the
    concatenation ``current + memory`` (replayed rows are ``len(current) + i``).
    """
    if not 0.0 <= replay_fraction < 1.0:
        raise DataError(f"replay_fraction must be in [0, 1), got {replay_fraction}")
    replayed = round(batch_size * replay_fraction) if memory else 0
    if replayed >= batch_size:
        raise DataError(f"replay_fraction {replay_fraction} leaves no current-task rows in a batch of {batch_size}")
    indices, real = train_indices(_lengths(current), batch_size - replayed, seed, step, chunk_batches)
    rng = np.random.default_rng([seed, _REPLAY_STREAM, step])
    picked = rng.choice(len(memory), replayed, replace=len(memory) < replayed) if replayed else []
    rows = [current[i] for i in indices] + [memory[i] for i in picked]
    batch = collate_train(rows, np.concatenate([real, np.ones(replayed, bool)]), spec, buckets)
    example_index = np.concatenate([indices, len(current) + np.asarray(picked, np.int64)]).astype(np.int32)
    return dict(batch, example_index=example_index)
