"""Reader for O-LoRA's CL_Benchmark layout: ``{root}/{TaskType}/{name}/{train,test,labels}.json``.

Each split is a JSON list of ``{"sentence": str, "label": str}``; ``labels.json`` is the verbaliser
list. A task without ``labels.json`` is open-ended (generation): its prompt has no ``Option:`` line.
``dev.json`` is never read: in the official copies it equals ``test.json``, so the validation split
is carved from train instead (:func:`jaxcl.data.task.split_validation`).
"""

from __future__ import annotations

import os

from jaxcl.data.files import find_task_dir, read_json, read_records
from jaxcl.data.task import DataError, Example, Task

# Zero-shot instructions per TaskType. The first seven are the strings of O-LoRA's
# configs/instruction_config.json; COPA has none there (its prompt is the sentence alone).
# NC/VC/ANT/HYP are the task types of the bundled WordNet stream, kept short for small CPU runs.
INSTRUCTIONS: dict[str, str | None] = {
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
    "Choose one from the option.\n",
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? '
    "Choose one from the option.\n",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "BoolQA": "According to the following passage, is the question true or false? Choose one from the option.\n",
    "MultiRC": "According to the following passage and question, is the candidate answer true or false? "
    "Choose one from the option.\n",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both sentence? "
    "Choose one from the option.\n",
    "COPA": None,
    "NC": "Classify the defined noun.\n",  # noun supersense from a gloss
    "VC": "Classify the defined verb.\n",  # verb supersense from a gloss
    "ANT": "Give the opposite word.\n",  # adjective antonym
    "HYP": "Give a more general word.\n",  # noun hypernym from the noun and its gloss
}


def cl_benchmark_prompt(task_type: str, dataset: str, sentence: str, labels: list[str] | None) -> str:
    """Builds the O-LoRA prompt for one example.

    ``"Task:{T}\\nDataset:{name}\\n" + instruction + "Option: a, b \\n" + sentence + "\\nAnswer:"``;
    the option line is left out for open-ended tasks, and COPA (no instruction) keeps only the
    task/dataset prefix, the sentence and the answer cue.
    """
    if task_type not in INSTRUCTIONS:
        raise DataError(f"unknown CL_Benchmark task type {task_type!r}; known: {sorted(INSTRUCTIONS)}")
    instruction = INSTRUCTIONS[task_type]
    body = sentence + "\nAnswer:"
    if instruction is not None:
        options = "Option: " + ", ".join(labels) + " \n" if labels else ""
        body = instruction + options + body
    return f"Task:{task_type}\nDataset:{dataset}\n" + body


def _read_labels(path: str) -> list[str]:
    labels = read_json(path)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{path}: expected a non-empty JSON list of label strings")
    return labels


def _read_split(path: str, task_type: str, dataset: str, labels: list[str] | None) -> list[Example]:
    records = read_records(path, ("sentence", "label"))
    if labels is not None:
        known = set(labels)
        for i, record in enumerate(records):
            if record["label"] not in known:
                raise DataError(f"{path}: example {i}: label {record['label']!r} is not in labels.json {labels}")
    return [Example(cl_benchmark_prompt(task_type, dataset, r["sentence"], labels), r["label"]) for r in records]


def load_cl_benchmark_task(root: str, name: str) -> Task:
    """Loads task ``name`` from anywhere under the TaskType folders of ``root``.

    Args:
      root: the ``CL_Benchmark`` folder.
      name: the task folder name (matched ignoring case, '-' and '_').

    Returns:
      A Task with metric ``"em"``; ``labels`` is None for open-ended tasks.
    """
    task_dir = find_task_dir(root, name)
    task_type = os.path.basename(os.path.dirname(task_dir))
    if task_type not in INSTRUCTIONS:
        raise DataError(
            f"{task_dir}: parent folder {task_type!r} is not a known TaskType; known: {sorted(INSTRUCTIONS)}"
        )
    dataset = os.path.basename(task_dir)
    labels_path = os.path.join(task_dir, "labels.json")
    labels = _read_labels(labels_path) if os.path.exists(labels_path) else None
    train, test = (
        _read_split(os.path.join(task_dir, f"{split}.json"), task_type, dataset, labels)
        for split in ("train", "test")
    )
    return Task(dataset, train, test, labels, "em")
