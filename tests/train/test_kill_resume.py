"""A real ``jaxcl run`` process killed with SIGKILL mid-task and resumed ends with the same results."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from jaxcl.methods import REGISTRY

from tiny_cl import METHOD_ARGS, TASKS, WRAPPER_ARGS, tiny_config


def _cli(*args):
    return [sys.executable, "-m", "jaxcl.cli", *args]


def _losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["event"] == "step"]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_identical_results(stream_root, tiny_model_dir, tmp_path):
    cfg = tiny_config(stream_root, model=tiny_model_dir,
                      train={"steps_per_task": 8, "batch_size": 4, "lr": 1e-2, "checkpoint_every": 1})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    subprocess.run(_cli("run", str(path), "--out", full), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_cli("run", str(path), "--out", killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = os.path.join(killed, "log.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once the second task is half trained
        if os.path.exists(log) and any('"phase": 1, "step": 4' in line for line in open(log)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "results.json"))

    subprocess.run(_cli("run", str(path), "--out", killed, "--resume"), check=True, env=env, capture_output=True)
    with open(os.path.join(full, "results.json")) as f:
        a = json.load(f)
    with open(os.path.join(killed, "results.json")) as f:
        b = json.load(f)
    assert a["matrix"] == b["matrix"] and a["metrics"] == b["metrics"] and a["base_scores"] == b["base_scores"]
    assert _losses(full) == _losses(killed)
    assert np.array(a["matrix"]).shape == (len(TASKS), len(TASKS))


RESUMED = sorted(REGISTRY) + ["replay+seq_lora", "mist+olora"]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One persistent compilation cache for the module: a resumed run reuses the programs of the first."""
    return str(tmp_path_factory.mktemp("xla"))


@pytest.mark.slow
@pytest.mark.parametrize("method", RESUMED)
def test_every_method_resumes_to_the_same_matrix_and_losses(method, stream_root, tiny_tokenizer, tmp_path,
                                                            compile_cache):
    from tiny_cl import tiny_llama

    from jaxcl.train import config as jconfig
    from jaxcl.train.loop import Interrupted, run

    cfg = jconfig.from_dict(tiny_config(
        stream_root, method=method, method_args={**METHOD_ARGS, **WRAPPER_ARGS}[method], compile_cache=compile_cache, data={"order": list(TASKS)[:2]},
        train={"steps_per_task": 3, "batch_size": 4, "lr": 1e-2, "checkpoint_every": 2},
        eval={"max_test_per_task": 4, "batch_size": 4, "max_new_tokens": 2}))

    def go(out, **kwargs):
        return run(cfg, str(out), progress=False, model_and_tokenizer=(tiny_llama(len(tiny_tokenizer)), tiny_tokenizer),
                   **kwargs)

    full = go(tmp_path / "full")
    with pytest.raises(Interrupted):  # inside the second task (mtl: inside its one joint phase)
        go(tmp_path / "killed", stop_after_steps=4)
    resumed = go(tmp_path / "killed", resume=True)
    for key in ("matrix", "base_scores", "metrics", "routing_accuracy", "validation_loss"):
        assert resumed[key] == full[key], key
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "full")
    assert len(_losses(tmp_path / "full")) == 6
