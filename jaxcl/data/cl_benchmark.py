"""Reader for O-LoRA's CL_Benchmark layout: ``{root}/{TaskType}/{name}/{train,test,labels}.json``.

Each split is a JSON list of ``{"sentence": str, "label": str}``; ``labels.json`` is the verbaliser
list. A task without ``labels.json`` is open-ended (generation): its prompt has no ``Option:`` line.
``dev.json`` is never read: in the official copies it equals ``test.json``, so the validation split
is carved from train instead (:func:`jaxcl.data.task.split_validation`).

Prompts are O-LoRA's (``src/uie_dataset_lora.py``, ``src/uie_collator.py`` with ``add_task_name`` and
``add_dataset_name`` True, as all its scripts set them): every sentence field is used verbatim (the
files already hold the per-dataset layout, e.g. BoolQA's ``question: ...\npassage: ...``, WiC's
``word: ...``, QQP's ``first sentence: ...``, COPA's ``Which sentence is the cause of ...? Choose one
between A and B.``), and labels keep the spelling of ``labels.json`` (``True``/``False``, ``A``/``B``);
exact match lower-cases both sides, as O-LoRA's ``normalize_answer`` does. Kept differences, for
decoder-only models: O-LoRA's LLaMA scripts train on ``"Answer:" + label`` with no space between,
jaxcl on ``"Answer: " + label`` (the tokenization the pretrained model sees in running text), and
an over-long prompt loses its middle here, its end (the options or the ``Answer:`` cue) there.

Labels outside ``labels.json``: an error, except for the published quirks in ``NO_GOLD_LABELS``.
The published MNLI test split holds 131 pairs labelled ``-``: GLUE's marker for a pair whose five
annotators reached no majority, i.e. a pair without a gold label. O-LoRA's code
(``src/uie_dataset_lora.py``, ``src/compute_metrics.py``) keeps them and scores them by exact match
after SQuAD normalisation, which removes punctuation: ``-`` becomes the empty string, so such a pair
counts as wrong for any non-empty answer and as right for an empty one. jaxcl leaves them out and
says how many in one ``DataWarning``: no answer can be right there, and the official rule would
reward a model that generates nothing. For a trained model, which always answers with a label, the
published MNLI accuracy is ours times (7600 - 131) / 7600 = 0.983 (at most 0.12 points of a 14-task
AP). A label outside ``labels.json`` anywhere else is taken as a broken file and stays an error.
"""

from __future__ import annotations

import os
import warnings

from jaxcl.data.files import find_task_dir, name_key, read_json, read_records
from jaxcl.data.task import DataError, DataWarning, Example, Task

# Published files whose examples may carry a label meaning "no gold answer": dataset name (as
# name_key spells it) -> that label. Examples with it are left out (see the module docstring).
NO_GOLD_LABELS = {"mnli": "-"}

# Zero-shot instructions per TaskType. The first seven are the strings of O-LoRA's
# configs/instruction_config.json (checked against O-LoRA/configs/instruction_config_cl.json of
# cmnfriend/O-LoRA); COPA has none there (its loader's template is the sentence alone).
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


def cl_benchmark_prompt(task_type: str, dataset: str, sentence: str, labels: list[str] | None, *,
                        task_name: bool = True, dataset_name: bool = True) -> str:
    """Builds the O-LoRA prompt for one example.

    ``"Task:{T}\\nDataset:{name}\\n" + instruction + "Option: a, b \\n" + sentence + "\\nAnswer:"``;
    the option line is left out for open-ended tasks, and COPA (no instruction) keeps only the
    task/dataset prefix, the sentence and the answer cue. ``task_name`` / ``dataset_name`` False leave
    the ``Task:`` / ``Dataset:`` line out (O-LoRA's ``add_task_name`` / ``add_dataset_name``): a prompt
    that names its task lets a router read the task off the text.

    Examples:
      >>> cl_benchmark_prompt("SC", "imdb", "Great film.", ["Good", "Bad"], task_name=False, dataset_name=False)
      'What is the sentiment of the following paragraph? Choose one from the option.\\nOption: Good, Bad \\nGreat film.\\nAnswer:'
    """
    if task_type not in INSTRUCTIONS:
        raise DataError(f"unknown CL_Benchmark task type {task_type!r}; known: {sorted(INSTRUCTIONS)}")
    instruction = INSTRUCTIONS[task_type]
    body = sentence + "\nAnswer:"
    if instruction is not None:
        options = "Option: " + ", ".join(labels) + " \n" if labels else ""
        body = instruction + options + body
    return f"Task:{task_type}\n" * task_name + f"Dataset:{dataset}\n" * dataset_name + body


def _read_labels(path: str) -> list[str]:
    labels = read_json(path)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{path}: expected a non-empty JSON list of label strings")
    return labels


def _with_gold_labels(records: list[dict], path: str, dataset: str, labels: list[str]) -> list[dict]:
    """The records whose label is in ``labels``, after leaving out the dataset's no-gold-label marker.

    Raises:
      DataError: any other label outside ``labels``, or a split that had only no-gold examples.
    """
    no_gold = NO_GOLD_LABELS.get(name_key(dataset))
    known = set(labels)
    for i, record in enumerate(records):
        if record["label"] not in known and record["label"] != no_gold:
            raise DataError(f"{path}: example {i}: label {record['label']!r} is not in labels.json {labels}")
    kept = [r for r in records if r["label"] in known]
    if len(kept) < len(records):
        if not kept:
            raise DataError(f"{path}: every example has the no-gold-label marker {no_gold!r}")
        warnings.warn(f"{path}: left out {len(records) - len(kept)} of {len(records)} examples labelled "
                      f"{no_gold!r} (no gold label; O-LoRA's scoring counts them as wrong)", DataWarning, stacklevel=2)
    return kept


def _read_split(path: str, task_type: str, dataset: str, labels: list[str] | None, **names: bool) -> list[Example]:
    records = read_records(path, ("sentence", "label"))
    if labels is not None:
        records = _with_gold_labels(records, path, dataset, labels)
    return [Example(cl_benchmark_prompt(task_type, dataset, r["sentence"], labels, **names), r["label"])
            for r in records]


def load_cl_benchmark_task(root: str, name: str, metric: str | None = None, *, task_name: bool = True,
                           dataset_name: bool = True) -> Task:
    """Loads task ``name`` from anywhere under the TaskType folders of ``root``.

    Args:
      root: the ``CL_Benchmark`` folder.
      name: the task folder name (matched ignoring case, '-' and '_').
      metric: overrides the benchmark's metric (exact match, ``"em"``).
      task_name, dataset_name: keep the prompts' ``Task:`` / ``Dataset:`` lines (``cl_benchmark_prompt``).

    Returns:
      A Task with metric ``metric or "em"``; ``labels`` is None for open-ended tasks.
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
        _read_split(os.path.join(task_dir, f"{split}.json"), task_type, dataset, labels, task_name=task_name,
                    dataset_name=dataset_name)
        for split in ("train", "test")
    )
    return Task(dataset, train, test, labels, metric or "em")
