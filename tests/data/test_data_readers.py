import json
import os

import pytest

from jaxcl.data import (
    DataError,
    DataWarning,
    Example,
    Task,
    cl_benchmark_prompt,
    load_cl_benchmark_task,
    load_superni_task,
    load_trace_task,
    split_validation,
)


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _task_dir(tmp_path, train, test="[{\"sentence\": \"x\", \"label\": \"a\"}]", labels='["a", "b"]'):
    """A one-task CL_Benchmark root at tmp_path/TC/toy; ``None`` leaves a file out."""
    for name, text in (("train.json", train), ("test.json", test), ("labels.json", labels)):
        if text is not None:
            _write(str(tmp_path / "TC" / "toy" / name), text)
    return str(tmp_path)


# --- CL_Benchmark ---------------------------------------------------------------------------------


def test_cl_benchmark_prompt_is_olora_format(fixtures_dir):
    task = load_cl_benchmark_task(os.path.join(fixtures_dir, "cl_benchmark"), "agnews")
    assert task.name == "agnews" and task.metric == "em"
    assert task.labels == ["World", "Sports", "Business", "Sci/Tech"]
    assert [len(task.train), len(task.test)] == [5, 2]
    assert task.train[0] == Example(
        "Task:TC\nDataset:agnews\n"
        "What is the topic of the following paragraph? Choose one from the option.\n"
        "Option: World, Sports, Business, Sci/Tech \n"
        "Stocks rallied after the central bank held rates.\nAnswer:",
        "Business",
    )
    assert task.test[1].answer == "Sci/Tech"


@pytest.mark.parametrize("task_name, dataset_name", [(False, True), (True, False), (False, False)])
def test_the_task_and_dataset_lines_can_be_left_out(fixtures_dir, task_name, dataset_name):
    from jaxcl.data import load_stream
    from jaxcl.train import config as jconfig
    from jaxcl.train.loop import load_tasks

    root = os.path.join(fixtures_dir, "cl_benchmark")
    full = load_cl_benchmark_task(root, "agnews").train[0]
    cut = load_stream("cl_benchmark", ["agnews"], root, task_name=task_name, dataset_name=dataset_name)[0].train[0]
    lines = ["Task:TC\n"] * task_name + ["Dataset:agnews\n"] * dataset_name
    assert cut == Example("".join(lines) + full.prompt.split("Dataset:agnews\n", 1)[1], full.answer)
    # the run config's data.task_name / data.dataset_name reach the reader (null: as O-LoRA's scripts)
    cfg = jconfig.from_dict({"data": {"source": "cl_benchmark", "root": root, "order": ["agnews"],
                                      "task_name": None if task_name else False,
                                      "dataset_name": None if dataset_name else False}})
    assert load_tasks(cfg)[0].train[0] == cut


def test_prompts_without_task_lines_refuse_the_options(fixtures_dir):
    from jaxcl.train import config as jconfig

    with pytest.raises(jconfig.ConfigError, match=r"config.data.task_name: superni prompts have no such line"):
        jconfig.from_dict({"data": {"source": "superni", "root": fixtures_dir, "order": ["x"], "task_name": True}})
    assert jconfig.from_dict({"data": {"source": "superni", "root": fixtures_dir, "order": ["x"],
                                       "dataset_name": False}}).data.dataset_name is False


def test_cl_benchmark_never_reads_dev_json(fixtures_dir):
    # The fixture's dev.json is malformed on purpose: loading must still succeed.
    dev = os.path.join(fixtures_dir, "cl_benchmark", "TC", "agnews", "dev.json")
    with pytest.raises(json.JSONDecodeError):
        json.load(open(dev))
    assert load_cl_benchmark_task(os.path.join(fixtures_dir, "cl_benchmark"), "agnews").test


def test_copa_has_no_instruction_and_no_options(fixtures_dir):
    task = load_cl_benchmark_task(os.path.join(fixtures_dir, "cl_benchmark"), "COPA")
    sentence = (
        "The sun was rising. What happened as a RESULT?\nOption1: The grass was cut.\nOption2: The sky brightened."
    )
    assert task.test[0].prompt == "Task:COPA\nDataset:COPA\n" + sentence + "\nAnswer:"
    assert task.labels == ["1", "2"]


def test_open_ended_task_has_no_option_line(fixtures_dir):
    task = load_cl_benchmark_task(os.path.join(fixtures_dir, "cl_benchmark"), "opposites")
    assert task.labels is None
    assert task.train[0].prompt == "Task:ANT\nDataset:opposites\nGive the opposite word.\nhot\nAnswer:"
    assert "Option" not in task.test[0].prompt


@pytest.mark.parametrize("spelling", ["SST-2", "sst2", "sst_2", "Sst-2"])
def test_task_found_by_name_under_any_task_type(fixtures_dir, spelling):
    task = load_cl_benchmark_task(os.path.join(fixtures_dir, "cl_benchmark"), spelling)
    assert task.name == "SST-2"
    assert task.train[0].prompt.startswith("Task:SC\nDataset:SST-2\nWhat is the sentiment")


def test_prompt_function_matches_design_formula():
    prompt = cl_benchmark_prompt("SC", "yelp", "great food", ["bad", "good"])
    assert prompt == (
        "Task:SC\nDataset:yelp\nWhat is the sentiment of the following paragraph? Choose one from the option.\n"
        "Option: bad, good \ngreat food\nAnswer:"
    )


# --- bad input --------------------------------------------------------------------------------------


def test_malformed_json_names_file_and_line(tmp_path):
    root = _task_dir(tmp_path, '[\n{"sentence": "a", "label": "a"},\n{"sentence": "b" "label": "b"}\n]')
    with pytest.raises(DataError, match=r"TC/toy/train\.json:3:\d+: malformed JSON"):
        load_cl_benchmark_task(root, "toy")


@pytest.mark.parametrize("record", ['{"label": "a"}', '{"sentence": "x"}', '{"sentence": 3, "label": "a"}', '"x"'])
def test_example_without_sentence_or_label_names_file_and_index(tmp_path, record):
    root = _task_dir(tmp_path, f'[{{"sentence": "ok", "label": "a"}}, {record}]')
    with pytest.raises(DataError, match=r"TC/toy/train\.json: example 1: "):
        load_cl_benchmark_task(root, "toy")


def test_label_not_in_labels_json(tmp_path):
    root = _task_dir(tmp_path, '[{"sentence": "ok", "label": "a"}]', test='[{"sentence": "x", "label": "zzz"}]')
    with pytest.raises(DataError, match=r"TC/toy/test\.json: example 0: label 'zzz' is not in labels\.json"):
        load_cl_benchmark_task(root, "toy")


def test_mnli_pairs_without_gold_label_are_left_out_with_one_warning(fixtures_dir):
    root = os.path.join(fixtures_dir, "cl_benchmark")
    with pytest.warns(DataWarning, match=r"NLI/MNLI/test\.json: left out 2 of 4 examples labelled '-'") as caught:
        task = load_cl_benchmark_task(root, "MNLI")
    assert len(caught) == 1
    assert [e.answer for e in task.test] == ["entailment", "contradiction"]
    assert task.test[1].prompt.endswith("sentence 2: The shop is open.\nAnswer:")
    assert len(task.train) == 3


def test_no_gold_marker_is_an_error_outside_mnli(tmp_path):
    root = _task_dir(tmp_path, '[{"sentence": "ok", "label": "a"}]', test='[{"sentence": "x", "label": "-"}]')
    with pytest.raises(DataError, match=r"TC/toy/test\.json: example 0: label '-' is not in labels\.json"):
        load_cl_benchmark_task(root, "toy")


def test_unknown_label_in_mnli_is_still_an_error(tmp_path):
    records = '[{"sentence": "x", "label": "-"}, {"sentence": "y", "label": "Entailment"}]'
    for name, text in (("train.json", records), ("test.json", records), ("labels.json", '["entailment", "neutral"]')):
        _write(str(tmp_path / "NLI" / "MNLI" / name), text)
    with pytest.raises(DataError, match=r"NLI/MNLI/train\.json: example 1: label 'Entailment' is not in labels"):
        load_cl_benchmark_task(str(tmp_path), "MNLI")


def test_split_of_only_no_gold_pairs_is_an_error(tmp_path):
    for name, text in (("train.json", '[{"sentence": "x", "label": "-"}]'), ("labels.json", '["entailment"]')):
        _write(str(tmp_path / "NLI" / "MNLI" / name), text)
    with pytest.raises(DataError, match=r"NLI/MNLI/train\.json: every example has the no-gold-label marker '-'"):
        load_cl_benchmark_task(str(tmp_path), "MNLI")


def test_empty_task(tmp_path):
    root = _task_dir(tmp_path, "[]")
    with pytest.raises(DataError, match=r"TC/toy/train\.json: the split is empty"):
        load_cl_benchmark_task(root, "toy")


def test_missing_test_split_names_file(tmp_path):
    root = _task_dir(tmp_path, '[{"sentence": "ok", "label": "a"}]', test=None)
    with pytest.raises(DataError, match=r"TC/toy/test\.json: cannot read file"):
        load_cl_benchmark_task(root, "toy")


def test_unknown_task_lists_known_ones(fixtures_dir):
    known = r"\['agnews', 'COPA', 'MNLI', 'opposites', 'SST-2'\]"
    with pytest.raises(DataError, match=r"unknown task 'imdb'; known tasks: " + known):
        load_cl_benchmark_task(os.path.join(fixtures_dir, "cl_benchmark"), "imdb")


def test_unknown_task_type_folder(tmp_path):
    _write(str(tmp_path / "Weird" / "toy" / "train.json"), '[{"sentence": "a", "label": "a"}]')
    with pytest.raises(DataError, match=r"'Weird' is not a known TaskType"):
        load_cl_benchmark_task(str(tmp_path), "toy")


def test_bad_labels_json(tmp_path):
    root = _task_dir(tmp_path, '[{"sentence": "ok", "label": "a"}]', labels='{"a": 1}')
    with pytest.raises(DataError, match=r"TC/toy/labels\.json: expected a non-empty JSON list"):
        load_cl_benchmark_task(root, "toy")


# --- SuperNI ----------------------------------------------------------------------------------------


def test_superni_reader(fixtures_dir):
    task = load_superni_task(os.path.join(fixtures_dir, "superni"), "task363_sst2_polarity_classification")
    assert task.metric == "rouge_l" and task.labels is None
    assert task.train[0].prompt == (
        "Definition: Given a sentence, label its sentiment as POS or NEG.\n\n"
        "Now complete the following example -\nInput: A lovely film.\nOutput: "
    )
    assert task.train[0].golds == ("POS",)
    # A list output trains on its first entry and keeps all of them for scoring.
    assert task.train[1].answer == "NEG" and task.train[1].golds == ("NEG", "negative")
    assert task.test[0].answer == "POS" and task.test[0].prompt.endswith("Input: Great acting.\nOutput: ")


def test_superni_bad_instance(tmp_path):
    task = {"Definition": ["d"], "Instances": [{"input": "x"}]}
    _write(str(tmp_path / "SuperNI" / "t1" / "train.json"), json.dumps(task))
    with pytest.raises(DataError, match=r"SuperNI/t1/train\.json: instance 0: 'output'"):
        load_superni_task(str(tmp_path), "t1")


def test_superni_missing_definition(tmp_path):
    _write(str(tmp_path / "t1" / "train.json"), json.dumps({"Instances": [{"input": "x", "output": "y"}]}))
    with pytest.raises(DataError, match=r"t1/train\.json: 'Definition'"):
        load_superni_task(str(tmp_path), "t1")


# --- TRACE ------------------------------------------------------------------------------------------


def test_trace_reader_and_metrics(fixtures_dir):
    root = os.path.join(fixtures_dir, "trace")
    stance = load_trace_task(root, "C-STANCE")
    assert stance.metric == "accuracy" and stance.train[0] == Example("Stance of: cats rule. Answer:", "A")
    assert load_trace_task(root, "Py150").metric == "edit_sim"
    assert load_trace_task(root, "Py150", metric="rouge_l").metric == "rouge_l"


def test_trace_unknown_metric_needs_override(tmp_path):
    _write(str(tmp_path / "MyTask" / "train.json"), '[{"prompt": "p", "answer": "a"}]')
    _write(str(tmp_path / "MyTask" / "test.json"), '[{"prompt": "p", "answer": "a"}]')
    with pytest.raises(DataError, match="no TRACE metric known for 'MyTask'"):
        load_trace_task(str(tmp_path), "MyTask")
    assert load_trace_task(str(tmp_path), "MyTask", metric="em").metric == "em"


def test_trace_missing_answer(tmp_path):
    _write(str(tmp_path / "FOMC" / "train.json"), '[{"prompt": "p"}]')
    with pytest.raises(DataError, match=r"FOMC/train\.json: example 0: missing or non-string 'answer'"):
        load_trace_task(str(tmp_path), "FOMC")


def test_task_rejects_unknown_metric():
    with pytest.raises(DataError, match="unknown metric 'bleu'"):
        Task("t", [], [], None, "bleu")


# --- validation split -------------------------------------------------------------------------------


def test_split_validation_is_seeded_disjoint_and_complete():
    examples = [Example(f"p{i}", f"a{i}") for i in range(50)]
    train, val = split_validation(examples, fraction=0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert sorted(train + val, key=lambda e: int(e.prompt[1:])) == examples
    assert [e.prompt for e in train] == sorted((e.prompt for e in train), key=lambda p: int(p[1:]))  # order kept
    assert split_validation(examples, fraction=0.2, seed=3) == (train, val)
    assert split_validation(examples, fraction=0.2, seed=4)[1] != val
    assert len(split_validation(examples, count=7, seed=0)[1]) == 7


@pytest.mark.parametrize("kwargs", [{}, {"fraction": 0.1, "count": 1}, {"fraction": 1.0}, {"count": 5}])
def test_split_validation_bad_arguments(kwargs):
    with pytest.raises(DataError, match="split_validation"):
        split_validation([Example("p", "a")] * 5, seed=0, **kwargs)
