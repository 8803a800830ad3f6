"""Per-example predictions of every evaluation, ``jaxcl report --wrong``, the heatmap that ``jaxcl run``
and ``jaxcl demo`` write and print, and no "PyTorch was not found" notice from transformers."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from jaxcl import cli
from jaxcl.train import config as jconfig
from jaxcl.train.loop import run

from tiny_cl import TASKS, tiny_config, tiny_llama

TWO = list(TASKS)[:2]
FIELDS = {"after", "task", "index", "prompt", "prediction", "references", "score"}


def _config(stream_root, method="seq_lora", **overrides):
    return tiny_config(stream_root, method=method, data={"order": TWO}, tensorboard=False,
                       train={"steps_per_task": 2, "batch_size": 4, "lr": 1e-2}, **overrides)


@pytest.fixture(scope="module")
def finished_run(stream_root, tiny_tokenizer, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "r")
    results = run(jconfig.from_dict(_config(stream_root)), out, progress=False,
                  model_and_tokenizer=(tiny_llama(len(tiny_tokenizer)), tiny_tokenizer))
    return out, results


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_every_evaluation_appends_one_scored_record_per_test_prompt(finished_run):
    out, results = finished_run
    rows = _lines(os.path.join(out, "predictions.jsonl"))
    evals = [r for r in _lines(os.path.join(out, "log.jsonl")) if r["event"] == "eval"]
    assert all(set(r) == FIELDS for r in rows)
    assert list(dict.fromkeys(r["after"] for r in rows)) == ["base", *TWO]
    for e in evals:
        for j, task in enumerate(TWO):
            mine = [r for r in rows if r["after"] == e["after"] and r["task"] == task]
            assert [r["index"] for r in mine] == list(range(8))  # the tiny stream's 8 test prompts
            # the task's score is the mean of its examples' scores (accuracy on this stream)
            assert np.mean([r["score"] for r in mine]) == pytest.approx(e["scores"][j])
            assert all(r["score"] == (100.0 if r["prediction"] in r["references"] else 0.0) for r in mine)
    assert results["matrix"] == [e["scores"] for e in evals[1:]]


def test_report_wrong_shows_up_to_n_wrong_answers_per_task(finished_run, capsys):
    out, _ = finished_run
    last = [r for r in _lines(os.path.join(out, "predictions.jsonl")) if r["after"] == TWO[-1]]
    assert cli.main(["report", out, "--wrong", "2"]) == 0
    text = capsys.readouterr().out
    assert f"heatmap: {os.path.join(out, 'matrix.png')}" in text and os.path.exists(os.path.join(out, "matrix.png"))
    assert f"wrong answers after {TWO[-1]} (up to 2 per task):" in text
    for task in TWO:
        wrong = [r for r in last if r["task"] == task and r["score"] < 100]
        assert f"  {task}: {len(wrong)} of 8 wrong" in text
        shown = [line for line in text.splitlines() if line.startswith("    #")
                 and any(line.startswith(f"    #{r['index']} {r['prompt']!r} -> {r['prediction']!r}") for r in wrong)]
        assert len(shown) == min(2, len(wrong))
    assert sum(line.startswith("    #") for line in text.splitlines()) == sum(
        min(2, sum(r["task"] == t and r["score"] < 100 for r in last)) for t in TWO)


def test_report_wrong_without_predictions_is_one_line_error(tmp_path, finished_run, capsys):
    out, _ = finished_run
    (tmp_path / "results.json").write_text(open(os.path.join(out, "results.json")).read())
    assert cli.main(["report", str(tmp_path), "--wrong", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "predictions.jsonl: cannot read" in err
    assert not (tmp_path / "matrix.png").exists()  # checked before anything is written


def test_cli_run_writes_and_prints_the_heatmap(stream_root, tiny_tokenizer, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "model"
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=1, pad_token_id=0, bos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(str(model_dir))
    tiny_tokenizer.save_pretrained(str(model_dir))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_config(stream_root, model=str(model_dir))))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out")]) == 0
    assert f"heatmap: {tmp_path / 'out' / 'matrix.png'}" in capsys.readouterr().out
    assert (tmp_path / "out" / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_demo_writes_and_prints_the_heatmap(stream_root, tiny_tokenizer, tmp_path, capsys, monkeypatch):
    import jaxcl.models

    # the demo's own model and data are minutes on a CPU: the tiny ones stand in
    monkeypatch.setattr(jaxcl.models, "load_model", lambda source: (tiny_llama(len(tiny_tokenizer)), tiny_tokenizer))
    monkeypatch.setattr(cli, "demo_config", lambda method, accelerator: _config(stream_root, method=method))
    assert cli.main(["demo", "--out", str(tmp_path), "--methods", "seq_lora"]) == 0
    text = capsys.readouterr().out
    for method in ("seq_lora",):
        assert f"heatmap: {tmp_path / method / 'matrix.png'}" in text and (tmp_path / method / "matrix.png").exists()


def test_no_pytorch_notice_without_torch():
    """transformers' notice appears on a torch-free import, and importing jaxcl first silences it."""
    code = "import sys; sys.modules['torch'] = None\n{}import transformers"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), JAX_PLATFORMS="cpu")
    plain = subprocess.run([sys.executable, "-c", code.format("")], capture_output=True, text=True, env=env)
    assert "PyTorch was not found" in plain.stderr  # the simulation does trigger it
    quiet = subprocess.run([sys.executable, "-c", code.format("import jaxcl.cli\n")], capture_output=True, text=True,
                           env=env, check=True)
    assert "PyTorch was not found" not in quiet.stderr + quiet.stdout
