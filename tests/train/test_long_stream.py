"""Every method runs a 15-task stream (the length of O-LoRA's long sequence) end to end: the matrix is
15 x 15 and every score is one that 2 test prompts can give (nothing breaks when the task index
passes the lengths the other tests use: pseudo-input capacity, expert pools, per-task slots, routers).
The tasks are copies of the three tiny tasks under new names."""
import os
import shutil

import numpy as np
import pytest

from jaxcl.methods import build
from jaxcl.train import config as jconfig
from jaxcl.train.loop import run
from tiny_cl import METHOD_ARGS, TASKS, WRAPPER_ARGS, tiny_config, tiny_llama, word_tokenizer, write_stream

LENGTH = 15
NAMES = [f"{name}_{i}" for i in range(LENGTH // len(TASKS)) for name in TASKS]


@pytest.fixture(scope="module")
def long_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("long"))
    write_stream(root)
    for name in NAMES:
        shutil.copytree(os.path.join(root, "TC", name.rsplit("_", 1)[0]), os.path.join(root, "TC", name))
    return root


@pytest.fixture(scope="module")
def long_tokenizer(long_root):
    from jaxcl.data import load_stream

    tasks = load_stream("cl_benchmark", list(TASKS), long_root)
    return word_tokenizer([e.prompt + " " + e.answer for t in tasks for e in t.train + t.test])


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(set(METHOD_ARGS) | set(WRAPPER_ARGS) - {"replay+any_ssr", "mist+seq_lora"}))
def test_a_fifteen_task_stream_runs_to_the_end(long_root, long_tokenizer, tmp_path, method):
    args = dict(METHOD_ARGS.get(method, {}), **WRAPPER_ARGS.get(method, {}))
    cfg = jconfig.from_dict(tiny_config(long_root, method=method, method_args=args, compile_cache=None,
                                        data={"order": NAMES},
                                        train={"steps_per_task": 1, "batch_size": 4, "lr": 1e-2},
                                        eval={"max_test_per_task": 2, "batch_size": 8, "max_new_tokens": 2}))
    results = run(cfg, str(tmp_path), model_and_tokenizer=(tiny_llama(len(long_tokenizer)), long_tokenizer),
                  progress=False)
    matrix = np.array(results["matrix"], dtype=float)
    phases = 1 if build(method, args).joint else LENGTH  # mtl: one phase over the union of the tasks
    assert matrix.shape == (phases, LENGTH) and np.isin(matrix, [0.0, 50.0, 100.0]).all()
    assert np.isfinite(results["metrics"]["AP"]) and len(results["tasks"]) == LENGTH
    routing = results.get("routing_accuracy")
    if routing is not None:
        assert np.array(routing).shape == (phases, LENGTH)
