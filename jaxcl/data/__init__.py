"""jaxcl's data layer: benchmark readers, task orders, scoring, tokenization and batching.

Typical use by the engine::

    tasks = load_stream("bundled", "wordnet")                 # or ("cl_benchmark", "order1", root)
    spec = make_batch_spec(tokenizer, "decoder", max_prompt_len=96, max_answer_len=16)
    train, val = split_validation(tasks[0].train, fraction=0.1, seed=0)
    train_tok = tokenize_examples(train, tokenizer, spec)
    batch = train_batch(train_tok, batch_size=8, seed=0, step=step, spec=spec)
    for indices, batch in eval_batches(tokenize_examples(tasks[0].test, tokenizer, spec), 32, spec):
        ...  # generate, then score(task.metric, [extract_answer(t) for t in texts], golds)
"""

from jaxcl.data.batching import (
    bucket_for,
    bucket_lengths,
    collate_eval,
    collate_train,
    epoch_batches,
    eval_batches,
    memory_indices,
    replay_batch,
    steps_per_epoch,
    train_batch,
    train_buckets,
    train_indices,
)
from jaxcl.data.cl_benchmark import INSTRUCTIONS, cl_benchmark_prompt, load_cl_benchmark_task
from jaxcl.data.orders import available_orders, load_order, order_format
from jaxcl.data.scoring import edit_similarity, exact_match, extract_answer, normalize_answer, rouge_l, score
from jaxcl.data.stream import BUNDLED_ROOT, load_bundled_stream, load_stream
from jaxcl.data.superni import load_superni_task, superni_prompt
from jaxcl.data.task import METRICS, DataError, DataWarning, Example, Task, split_validation
from jaxcl.data.tokenization import BatchSpec, TokenizedExample, make_batch_spec, tokenize_example, tokenize_examples
from jaxcl.data.trace import TRACE_METRICS, load_trace_task

__all__ = [
    "BUNDLED_ROOT",
    "BatchSpec",
    "DataError",
    "DataWarning",
    "Example",
    "INSTRUCTIONS",
    "METRICS",
    "TRACE_METRICS",
    "Task",
    "TokenizedExample",
    "available_orders",
    "bucket_for",
    "bucket_lengths",
    "cl_benchmark_prompt",
    "collate_eval",
    "collate_train",
    "edit_similarity",
    "epoch_batches",
    "eval_batches",
    "exact_match",
    "extract_answer",
    "load_bundled_stream",
    "load_cl_benchmark_task",
    "load_order",
    "load_stream",
    "load_superni_task",
    "load_trace_task",
    "make_batch_spec",
    "memory_indices",
    "normalize_answer",
    "order_format",
    "replay_batch",
    "rouge_l",
    "score",
    "split_validation",
    "steps_per_epoch",
    "superni_prompt",
    "tokenize_example",
    "tokenize_examples",
    "train_batch",
    "train_buckets",
    "train_indices",
]
