"""Reader for SuperNI tasks in SAPT's layout: ``{root}/SuperNI/{task}/{train,dev,test}.json``.

Each split file is a SuperNI task object: ``"Definition"`` (a string or a list whose first entry is
used) and ``"Instances": [{"input": str, "output": str | [str, ...]}]``. When ``output`` is a list,
the first entry is the training answer and all entries are kept as scoring references. Tasks are
scored with ROUGE-L.

The prompt is the one SAPT feeds its models for SuperNI (``src/cl_dataset.py`` with
``add_task_name``/``add_dataset_name`` False, as its SuperNI scripts set them): the stripped
definition, the input verbatim, and the ``Output: `` cue. One difference is kept on purpose: for an
instance with several gold outputs (quoref: 17 of 100 test instances, glucose: 23 of 100), SAPT trains
on and scores against one output drawn at random, jaxcl trains on the first and scores the best
match over all of them (Super-NaturalInstructions' own rule), which is deterministic and can only
score higher.
"""

from __future__ import annotations

import os

from jaxcl.data.files import find_task_dir, read_json
from jaxcl.data.task import DataError, Example, Task


def superni_prompt(definition: str, text: str) -> str:
    """The zero-shot SuperNI prompt (definition, then the input, then the ``Output:`` cue)."""
    return f"Definition: {definition}\n\nNow complete the following example -\nInput: {text}\nOutput: "


def _definition(data: dict, path: str) -> str:
    definition = data.get("Definition")
    if isinstance(definition, list) and definition and isinstance(definition[0], str):
        return definition[0].strip()
    if isinstance(definition, str):
        return definition.strip()
    raise DataError(f"{path}: 'Definition' must be a string or a non-empty list of strings")


def _outputs(output, path: str, i: int) -> tuple[str, ...]:
    outputs = (output,) if isinstance(output, str) else tuple(output) if isinstance(output, list) else ()
    if not outputs or not all(isinstance(o, str) for o in outputs):
        raise DataError(f"{path}: instance {i}: 'output' must be a string or a non-empty list of strings")
    return outputs


def _read_split(path: str) -> list[Example]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a SuperNI task object with 'Definition' and 'Instances'")
    definition = _definition(data, path)
    instances = data.get("Instances")
    if not isinstance(instances, list):
        raise DataError(f"{path}: missing 'Instances' list")
    if not instances:
        raise DataError(f"{path}: the split is empty")
    examples = []
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict) or not isinstance(instance.get("input"), str):
            raise DataError(f"{path}: instance {i}: expected an object with a string 'input'")
        golds = _outputs(instance.get("output"), path, i)
        references = golds if len(golds) > 1 else ()
        examples.append(Example(superni_prompt(definition, instance["input"]), golds[0], references))
    return examples


def load_superni_task(root: str, name: str, metric: str | None = None) -> Task:
    """Loads SuperNI task ``name`` (e.g. ``task363_sst2_polarity_classification``).

    Args:
      root: SAPT's ``CL_Benchmark`` folder (holding ``SuperNI/``) or the ``SuperNI`` folder itself.
      name: the task folder name.
      metric: overrides SAPT's metric (``"rouge_l"``).
    """
    task_dir = find_task_dir(root, name)
    train, test = (_read_split(os.path.join(task_dir, f"{split}.json")) for split in ("train", "test"))
    return Task(os.path.basename(task_dir), train, test, None, metric or "rouge_l")
