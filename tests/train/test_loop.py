"""The continual-learning loop end to end on a tiny model: results.json, resume, bad input, CLI."""
import json
import os
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jaxcl import cli
from jaxcl.train import config as jconfig
from jaxcl.train.loop import Interrupted, RunError, run

from tiny_cl import TASKS, tiny_config, tiny_llama


def _run(stream_root, out, tiny_model, **overrides):
    cfg = jconfig.from_dict(tiny_config(stream_root, **overrides))
    return run(cfg, str(out), model_and_tokenizer=tiny_model, progress=False)


def _steps(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_results_json_schema_and_matrix_shape(stream_root, tmp_path, tiny_model):
    results = _run(stream_root, tmp_path, tiny_model)
    with open(tmp_path / "results.json") as f:
        on_disk = json.load(f)
    assert on_disk["matrix"] == results["matrix"]
    for key in ("method", "model", "tasks", "matrix", "base_scores", "metrics", "config", "versions"):
        assert key in on_disk
    assert on_disk["tasks"] == list(TASKS)
    matrix = np.array(on_disk["matrix"])
    assert matrix.shape == (3, 3)
    # each row is the evaluation logged after its task, and each score the mean of its prompts' scores
    evals = {r["after"]: r["scores"] for r in _steps(tmp_path) if r["event"] == "eval"}
    assert [evals[name] for name in TASKS] == on_disk["matrix"] and evals["base"] == on_disk["base_scores"]
    with open(tmp_path / "predictions.jsonl") as f:
        predictions = [json.loads(line) for line in f]
    for i, after in enumerate(TASKS):
        for j, task in enumerate(TASKS):
            rows = [p["score"] for p in predictions if p["after"] == after and p["task"] == task]
            assert rows and np.isclose(np.mean(rows), matrix[i, j]), (after, task)
    assert set(on_disk["metrics"]) == {"AP", "BWT", "FWT", "forgetting"}
    np.testing.assert_allclose(on_disk["metrics"]["AP"], matrix[-1].mean())
    steps = [r for r in _steps(tmp_path) if r["event"] == "step"]
    assert len(steps) == 3 * 6 and all(np.isfinite(r["loss"]) for r in steps)
    end = _steps(tmp_path)[-1]
    assert end["event"] == "end" and end["peak_memory_gib"] is None  # the CPU keeps no statistics
    timings = ("seconds", "train_seconds", "eval_seconds", "hook_seconds", "compile_seconds")
    assert {k: end[k] for k in timings} == {k: on_disk[k] for k in timings}
    assert on_disk["train_seconds"] + on_disk["eval_seconds"] + on_disk["hook_seconds"] <= on_disk["seconds"]


def test_a_run_reports_the_process_peak_before_it_started(stream_root, tmp_path, tiny_model, monkeypatch):
    from jaxcl.train import loop

    peaks = iter([3.5, 4.25])  # a device's peak: before the run, then at its end
    monkeypatch.setattr(loop, "peak_memory_gib", lambda devices=None: next(peaks))
    results = _run(stream_root, tmp_path, tiny_model)
    assert (results["peak_memory_gib_at_start"], results["peak_memory_gib"]) == (3.5, 4.25)


def test_the_methods_work_between_tasks_is_timed_apart(stream_root, tmp_path, tiny_model, monkeypatch):
    from jaxcl.methods.seq_lora import SeqLoRA

    begin = SeqLoRA.begin_task

    def slow_begin(self, key, state, task):  # a stand-in for a scoring pass or a routing fit
        time.sleep(0.25)
        return begin(self, key, state, task)

    monkeypatch.setattr(SeqLoRA, "begin_task", slow_begin)
    results = _run(stream_root, tmp_path, tiny_model, method="seq_lora")
    hooks = [r for r in _steps(tmp_path) if r["event"] in ("begin_task", "end_task")]
    assert [(r["event"], r["phase"]) for r in hooks] == [(e, p) for p in range(3) for e in ("begin_task", "end_task")]
    assert all(r["seconds"] >= 0.25 for r in hooks if r["event"] == "begin_task")
    assert abs(results["hook_seconds"] - sum(r["seconds"] for r in hooks)) < 0.06 and results["hook_seconds"] >= 0.75


def test_peak_memory_is_the_highest_device_peak_in_gib():
    from jaxcl.train.loop import peak_memory_gib

    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    devices = [Device({"peak_bytes_in_use": 3 * 2**30, "bytes_in_use": 1}), Device({"peak_bytes_in_use": 2**29})]
    assert peak_memory_gib(devices) == 3.0
    assert peak_memory_gib([Device(None), Device({})]) is None


def test_attention_path_and_remat_from_the_config_train_the_same(stream_root, tmp_path, tiny_model):
    plain = _run(stream_root, tmp_path / "plain", tiny_model, method="seq_lora")
    fused = _run(stream_root, tmp_path / "fused", tiny_model, method="seq_lora", attention="xla",
                 remat="dots_with_no_batch_dims_saveable")
    assert fused["config"]["attention"] == "xla" and tiny_model[0].attention is None  # caller's model untouched
    losses = [[r["loss"] for r in _steps(out) if r["event"] == "step"] for out in (tmp_path / "plain", tmp_path / "fused")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=2e-4)
    assert fused["matrix"] == plain["matrix"]
    # the setting reaches the model: cuDNN attention cannot run on the CPU backend
    with pytest.raises(Exception, match="(?i)cudnn|gpu|cuda"):
        _run(stream_root, tmp_path / "cudnn", tiny_model, method="seq_lora", attention="cudnn")


def test_remat_auto_recomputes_on_accelerators_only(stream_root, tmp_path, tiny_model, monkeypatch):
    seen = []
    real_split = nnx.split
    monkeypatch.setattr(nnx, "split", lambda model, *a: (seen.append(getattr(model, "remat", None)), real_split(model, *a))[1])
    assert jconfig.from_dict({}).remat == "auto"
    _run(stream_root, tmp_path / "cpu", tiny_model, method="seq_lora")
    assert seen[0] is False and tiny_model[0].remat is False
    seen.clear()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    _run(stream_root, tmp_path / "gpu", tiny_model, method="seq_lora")
    assert seen[0] is True and tiny_model[0].remat is False  # the caller's model keeps its own setting


def test_killed_and_resumed_run_ends_with_the_same_results(stream_root, tmp_path, tiny_tokenizer):
    overrides = {"train": {"steps_per_task": 6, "batch_size": 4, "lr": 1e-2, "checkpoint_every": 2}}
    full = _run(stream_root, tmp_path / "full", (tiny_llama(len(tiny_tokenizer)), tiny_tokenizer), **overrides)
    cfg = jconfig.from_dict(tiny_config(stream_root, **overrides))
    out = str(tmp_path / "killed")
    # stop mid-task 1 (after 9 of 18 steps), then again inside task 2, then finish
    with pytest.raises(Interrupted):
        run(cfg, out, model_and_tokenizer=(tiny_llama(len(tiny_tokenizer)), tiny_tokenizer), progress=False,
            stop_after_steps=9)
    assert not os.path.exists(os.path.join(out, "results.json"))
    with pytest.raises(Interrupted):
        run(cfg, out, resume=True, model_and_tokenizer=(tiny_llama(len(tiny_tokenizer)), tiny_tokenizer),
            progress=False, stop_after_steps=4)
    resumed = run(cfg, out, resume=True, model_and_tokenizer=(tiny_llama(len(tiny_tokenizer)), tiny_tokenizer),
                  progress=False)
    assert resumed["matrix"] == full["matrix"]
    assert resumed["base_scores"] == full["base_scores"]
    assert resumed["metrics"] == full["metrics"]
    full_losses = [r["loss"] for r in _steps(tmp_path / "full") if r["event"] == "step"]
    resumed_losses = [r["loss"] for r in _steps(out) if r["event"] == "step"]
    assert resumed_losses == full_losses


def test_output_folder_of_another_run_is_refused(stream_root, tmp_path, tiny_model):
    _run(stream_root, tmp_path, tiny_model, train={"steps_per_task": 1})
    with pytest.raises(RunError, match="--resume"):
        _run(stream_root, tmp_path, tiny_model, train={"steps_per_task": 1})


def test_replay_and_per_task_oracle_run(stream_root, tmp_path, tiny_model):
    results = _run(stream_root, tmp_path / "a", tiny_model, method="replay+per_task",
                   method_args={"replay_fraction": 0.25, "replay_per_task": 4})
    assert np.array(results["matrix"]).shape == (3, 3)


def test_mtl_reports_one_joint_row(stream_root, tmp_path, tiny_model):
    results = _run(stream_root, tmp_path, tiny_model, method="mtl")
    assert np.array(results["matrix"]).shape == (1, 3)
    assert results["metrics"]["BWT"] is None and results["metrics"]["AP"] is not None


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@pytest.mark.parametrize("body, message", [
    ("method: olora\ntrain: {batch_size: eight}\n", "train.batch_size: expected int"),
    ("method: olora\ntrain: {steps: 3}\n", "unknown field"),
    ("method: nope\ndata: {source: bundled}\n", "unknown method 'nope'"),
    ("method: olora\nmethod_args: {rank: 4, colour: red}\n", "method_args.colour"),
    ("method: [olora\n", "line"),
    ("method: olora\nattention: flash\n", "attention: expected null, 'cudnn' or 'xla'"),
    ("method: olora\nremat: everything\n", "remat: expected auto, true, false or a jax.checkpoint_policies name"),
])
def test_bad_config_exits_2_with_one_clear_error(tmp_path, capsys, body, message):
    cfg = _write(tmp_path / "bad.yaml", body)
    code = cli.main(["run", cfg, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "out" / "results.json")


def test_unknown_task_in_order_exits_2(stream_root, tmp_path, capsys):
    cfg = _write(tmp_path / "c.yaml", f"data: {{source: cl_benchmark, root: {stream_root}, order: [colors, nosuch]}}\n"
                                       "model: /nonexistent/model\n")
    code = cli.main(["run", cfg, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "nosuch" in err
    assert not os.path.exists(tmp_path / "out" / "results.json")


def test_report_prints_matrix_and_writes_heatmap(stream_root, tmp_path, tiny_model, capsys):
    _run(stream_root, tmp_path, tiny_model, train={"steps_per_task": 1})
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "after colors" in out and "AP" in out
    with open(tmp_path / "matrix.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # several runs: one comparison line per run, with that run's own AP
    _run(stream_root, tmp_path / "seq", tiny_model, method="seq_lora", train={"steps_per_task": 1})
    assert cli.main(["report", str(tmp_path), str(tmp_path / "seq")]) == 0
    table = capsys.readouterr().out.split("forgetting\n")[-1].splitlines()
    for line, folder in zip(table, (tmp_path, tmp_path / "seq")):
        with open(folder / "results.json") as f:
            results = json.load(f)
        assert line.split()[:2] == [results["method"], f"{results['metrics']['AP']:.1f}"]
    assert len(table) == 2


def test_encoder_decoder_run_adapts_every_attention_block(stream_root, tmp_path, tiny_tokenizer):
    from tiny_cl import tiny_t5

    model = tiny_t5(len(tiny_tokenizer))
    results = _run(stream_root, tmp_path, (model, tiny_tokenizer), method="olora")
    assert np.array(results["matrix"]).shape == (3, 3)
    steps = [r for r in _steps(tmp_path) if r["event"] == "step"]
    assert len(steps) == 18 and all(np.isfinite(r["loss"]) for r in steps)


def test_a_users_own_trace_layout_task_runs_with_the_configs_metric(stream_root, tmp_path, tiny_model):
    from jaxcl.data import DataError, load_stream

    colors = load_stream("cl_benchmark", ["colors"], stream_root)[0]
    folder = tmp_path / "mine" / "MyTask"
    folder.mkdir(parents=True)
    for split, examples in (("train", colors.train), ("test", colors.test)):
        rows = [{"prompt": e.prompt, "answer": e.answer} for e in examples]
        (folder / f"{split}.json").write_text(json.dumps(rows))
    data = {"source": "trace", "root": str(tmp_path / "mine"), "order": ["MyTask"]}
    with pytest.raises(DataError, match="no TRACE metric known for 'MyTask'"):
        _run(stream_root, tmp_path / "without", tiny_model, data=data)
    results = _run(stream_root, tmp_path / "with", tiny_model, data=data, eval={"metric": "em"},
                   train={"steps_per_task": 2})
    assert results["tasks"] == ["MyTask"] and len(results["matrix"]) == 1
