"""A longer stream compiles nothing more: on a 4-task stream whose tasks 2 and 3 are copies of tasks 0
and 1, no XLA compilation happens after the second task's evaluation (no per-task hook recompiles for
a new task index; programs whose shapes follow the number of tasks compile once, at the start), and
none after the first task's unless the method starts new work with the second task (SAPT's routing
fit): the state the first task starts from is placed as every later one is. The same run checks that
device memory does not grow with the number of tasks: the live arrays after the fourth task take no
more bytes than after the second (per-task state is allocated for every task at the start).

The run is a fresh process; this file is also its script (``python test_compile_count.py ROOT METHOD``).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
NAMES = ["colors", "animals", "colors_again", "animals_again"]  # tasks 2, 3: copies of 0, 1
STARTS_WORK_AT_TASK_1 = {"sapt"}  # its routing fit and pseudo-inputs begin with the second task


@pytest.fixture(scope="module")
def four_task_root(tmp_path_factory):
    from tiny_cl import write_stream

    root = str(tmp_path_factory.mktemp("four"))
    write_stream(root)
    for name in ("colors", "animals"):  # the same data, so any extra compile is due to the task index
        shutil.copytree(os.path.join(root, "TC", name), os.path.join(root, "TC", f"{name}_again"))
    return root


def _after_each_evaluation(root: str, method: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    proc = subprocess.run([sys.executable, __file__, root, method], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["seq_lora", "sapt", "smat", "mist+seq_lora"])
def test_later_tasks_compile_nothing_and_hold_no_more_memory(four_task_root, method):
    seen = _after_each_evaluation(four_task_root, method)  # base, then after each task
    counts, live = seen["compilations"], seen["live_bytes"]
    assert len(counts) == 5 and counts[2] > 0
    assert counts[4] == counts[2], f"{method}: compilations after each evaluation {counts}"
    if method not in STARTS_WORK_AT_TASK_1:
        assert counts[2] == counts[1], f"{method}: the second task compiled again {counts}"
    assert live[4] <= live[2], f"{method}: live device bytes after each evaluation {live}"


def _worker(root: str, method: str) -> None:
    import gc
    import tempfile

    import jax

    from tiny_cl import tiny_config, tiny_llama, word_tokenizer

    from jaxcl.data import load_stream
    from jaxcl.train import compilation, config as jconfig
    from jaxcl.train.evaluate import Evaluator
    from jaxcl.train.loop import run

    clock, counts, live = compilation.Clock(), [], []
    evaluate = Evaluator.evaluate

    def counted(self, *args):
        result = evaluate(self, *args)
        counts.append(clock.count())
        gc.collect()  # arrays nothing refers to any more are not the run's memory
        live.append(sum(x.nbytes for x in jax.live_arrays()))
        return result

    Evaluator.evaluate = counted  # (this process only runs this one run)
    tasks = load_stream("cl_benchmark", NAMES, root)
    tokenizer = word_tokenizer([e.prompt + " " + e.answer for t in tasks for e in t.train + t.test])
    cfg = jconfig.from_dict(tiny_config(root, method=method, compile_cache=None, data={"order": NAMES},
                                        train={"steps_per_task": 2, "batch_size": 4, "lr": 1e-2},
                                        eval={"max_test_per_task": 4, "batch_size": 4, "max_new_tokens": 2}))
    with tempfile.TemporaryDirectory() as out:
        run(cfg, os.path.join(out, "run"), progress=False, model_and_tokenizer=(tiny_llama(len(tokenizer)), tokenizer))
    print(json.dumps({"compilations": counts, "live_bytes": live}))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
