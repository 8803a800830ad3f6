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

from tiny_cl import TASKS, tiny_config


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny torch Llama over the word tokenizer, saved as an HF folder (what a user passes as model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1, eos_token_id=1,
                         pad_token_id=0, bos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    tiny_tokenizer.save_pretrained(str(directory))
    return str(directory)


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
