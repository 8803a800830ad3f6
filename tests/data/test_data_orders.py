import os

import pytest

from jaxcl.data import (
    INSTRUCTIONS,
    TRACE_METRICS,
    DataError,
    available_orders,
    load_order,
    load_stream,
    order_format,
)
from jaxcl.data.files import name_key

# O-LoRA's CL_Benchmark folders, by TaskType (the names long orders must use).
CL_BENCHMARK = {
    "TC": ["dbpedia", "amazon", "yahoo", "agnews"],
    "SC": ["amazon", "yelp", "IMDB", "SST-2"],
    "NLI": ["MNLI", "CB", "RTE"],
    "QQP": ["QQP"], "BoolQA": ["BoolQA"], "COPA": ["COPA"], "MultiRC": ["MultiRC"], "WiC": ["WiC"],
}
CL_ORDERS = {  # the standard CL benchmark orders (O-LoRA's), names as O-LoRA writes them (its "boolq" is the folder BoolQA)
    "order1": "dbpedia amazon yahoo agnews",
    "order2": "dbpedia amazon agnews yahoo",
    "order3": "yahoo amazon agnews dbpedia",
    "order4": "mnli cb wic copa qqp boolq rte imdb yelp amazon sst-2 dbpedia agnews multirc yahoo",
    "order5": "multirc boolq wic mnli cb copa qqp rte imdb sst-2 dbpedia agnews yelp amazon yahoo",
    "order6": "yelp amazon mnli cb copa qqp rte imdb sst-2 dbpedia agnews yahoo multirc boolq wic",
}


@pytest.mark.parametrize("name", sorted(CL_ORDERS))
def test_cl_benchmark_orders_match_published_and_folder_names(name):
    tasks = load_order(name)
    assert [{"boolqa": "boolq"}.get(t.lower(), t.lower()) for t in tasks] == CL_ORDERS[name].split()
    folders = {t for names in CL_BENCHMARK.values() for t in names}
    assert set(tasks) <= folders
    assert order_format(name) == "cl_benchmark"


def test_sapt_alias_is_order6():
    assert "sapt_order4" in available_orders()
    assert load_order("sapt_order4") == load_order("order6")


def test_superni_orders():
    first, second = load_order("superni_order1"), load_order("superni_order2")
    assert len(first) == 15 and sorted(first) == sorted(second)
    assert [t.split("_")[0] for t in second] == [
        f"task{n}" for n in "748 073 1590 639 1572 1687 591 363 1510 1729 181 511 002 1290 875".split()
    ]
    assert first[:2] == ["task1572_samsum_summary", "task363_sst2_polarity_classification"]
    assert order_format("superni_order1") == "superni"


def test_trace_order_tasks_have_metrics():
    tasks = load_order("trace")
    assert tasks == ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]
    assert set(tasks) == set(TRACE_METRICS)


def test_every_order_file_loads():
    for name in available_orders():
        tasks = load_order(name)
        assert tasks and len(set(tasks)) == len(tasks), name


def test_unknown_order_lists_known_ones():
    with pytest.raises(DataError, match=r"unknown task order 'order9'; known orders: \[.*'order1'.*'sapt_order4'"):
        load_order("order9")


def test_load_stream_from_fixture_root(fixtures_dir):
    root = os.path.join(fixtures_dir, "cl_benchmark")
    tasks = load_stream("cl_benchmark", ["sst2", "agnews"], root)
    assert [t.name for t in tasks] == ["SST-2", "agnews"]
    superni = load_stream("superni", ["task363_sst2_polarity_classification"], os.path.join(fixtures_dir, "superni"))
    assert superni[0].metric == "rouge_l"


def test_unknown_task_in_order_lists_known_ones(fixtures_dir):
    # order1 names dbpedia first; the fixture root only has agnews, COPA, opposites and SST-2.
    with pytest.raises(DataError, match=r"unknown task 'dbpedia'; known tasks: \['agnews', 'COPA'"):
        load_stream("cl_benchmark", "order1", os.path.join(fixtures_dir, "cl_benchmark"))


@pytest.mark.parametrize(
    "args, message",
    [
        (("superni", "order1", "/tmp"), "order 'order1' lists cl_benchmark tasks, not superni tasks"),
        (("cl_benchmark", "order1", None), "needs the benchmark root folder"),
        (("bundled", "wordnet", "/tmp"), "takes no root folder"),
        (("mmlu", "order1", "/tmp"), "unknown data source 'mmlu'"),
        (("cl_benchmark", [], "/tmp"), "the task order is empty"),
        (("cl_benchmark", ["a", "a"], "/tmp"), "repeats a task"),
    ],
)
def test_load_stream_bad_arguments(args, message):
    with pytest.raises(DataError, match=message):
        load_stream(*args)


def test_name_key_matches_spellings():
    assert name_key("SST-2") == name_key("sst2") == name_key("Sst_2")
    assert name_key("MNLI") != name_key("QNLI")


def test_instruction_table_has_every_olora_type():
    assert set(CL_BENCHMARK) <= set(INSTRUCTIONS)
    assert INSTRUCTIONS["COPA"] is None
