"""SMAT's gate sparsity against the number of steps per task, on the tests' tiny Llama (CPU, ~1 min).

    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python experiments/smat/sparsity_steps.py 10 30 70

Prints the share of zero gates per expert after a 3-task run of each length (batch 4, lr 1e-3): the
gates close at the pace of their learning rate, so a short budget leaves them open
(experiments/standard_order1/CLAIMS.md).
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
from tiny_cl import TASKS, tiny_config, tiny_llama, word_tokenizer, write_stream  # noqa: E402

from jaxcl.data import load_stream  # noqa: E402
from jaxcl.train import config as jconfig  # noqa: E402
from jaxcl.train.loop import run  # noqa: E402


def main(steps_per_task: list[int]) -> None:
    root = tempfile.mkdtemp()
    write_stream(root)
    tasks = load_stream("cl_benchmark", list(TASKS), root)
    tokenizer = word_tokenizer([e.prompt + " " + e.answer for t in tasks for e in t.train + t.test])
    for steps in steps_per_task:
        cfg = jconfig.from_dict(tiny_config(root, method="smat", compile_cache=None,
                                            train={"steps_per_task": steps, "batch_size": 4, "lr": 1e-3},
                                            eval={"max_test_per_task": 4, "batch_size": 4, "max_new_tokens": 2}))
        with tempfile.TemporaryDirectory() as out:
            results = run(cfg, os.path.join(out, "run"), progress=False,
                          model_and_tokenizer=(tiny_llama(len(tokenizer)), tokenizer))
        print(steps, "steps a task: zero gates per expert",
              [round(x, 3) for x in results["method_report"]["sparsity_per_expert"]])


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [10, 30, 70])
