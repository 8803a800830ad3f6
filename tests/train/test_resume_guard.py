"""Resuming: a changed config is refused unless the field is allowed; a diverged run keeps its last good
checkpoint and resumes with a lower learning rate; with replay, an epoch still counts current rows."""
import json
import math
import os

import numpy as np
import pytest

from jaxcl import methods
from jaxcl.train import config as jconfig
from jaxcl.train.loop import Interrupted, RunError, run

from tiny_cl import TASKS, tiny_config, tiny_llama

TWO = {"order": list(TASKS)[:2]}
SMALL_EVAL = {"max_test_per_task": 4, "batch_size": 4, "max_new_tokens": 2}


def _cfg(stream_root, **overrides):
    train = dict({"steps_per_task": 4, "batch_size": 4, "lr": 1e-2, "checkpoint_every": 1}, **overrides.pop("train", {}))
    overrides.setdefault("method", "seq_lora")
    return jconfig.from_dict(tiny_config(stream_root, data=TWO, eval=SMALL_EVAL, train=train, compile_cache=None,
                                         **overrides))


def _run(cfg, out, tok, **kwargs):
    return run(cfg, str(out), model_and_tokenizer=(tiny_llama(len(tok)), tok), progress=False, **kwargs)


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_refuses_a_changed_config_unless_the_field_is_allowed(stream_root, tmp_path, tiny_tokenizer):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        _run(_cfg(stream_root), out, tiny_tokenizer, stop_after_steps=2)
    changed = _cfg(stream_root, train={"lr": 5e-3, "batch_size": 8})
    with pytest.raises(jconfig.ConfigError) as refused:
        _run(changed, out, tiny_tokenizer, resume=True)
    message = str(refused.value)
    assert "train.lr: 0.01 -> 0.005" in message and "train.batch_size: 4 -> 8" in message and "\n" not in message
    with pytest.raises(jconfig.ConfigError, match=r"train.batch_size: 4 -> 8"):  # lr allowed, batch size not
        _run(changed, out, tiny_tokenizer, resume=True, allow_changed=("train.lr",))
    with pytest.raises(jconfig.ConfigError, match="not a field a resumed run may change"):
        _run(changed, out, tiny_tokenizer, resume=True, allow_changed=("train.lr", "train.batch_size"))
    results = _run(_cfg(stream_root, train={"lr": 5e-3}), out, tiny_tokenizer, resume=True, allow_changed=("train.lr",))
    assert results["config"]["train"]["lr"] == 5e-3
    with open(out / "config.json") as f:  # the next resume compares with the config it last ran with
        assert json.load(f)["train"]["lr"] == 5e-3


def test_diverged_run_keeps_the_last_good_checkpoint_and_resumes_with_a_lower_lr(stream_root, tmp_path,
                                                                                 tiny_tokenizer):
    out = tmp_path / "run"
    # one warm-up step: update 1 has lr 0, update 2 lr 1e30, so step 3 (on update 2's weights) diverges
    # and the checkpoint after update 2 must not be the one a resume starts from
    blowup = {"lr": 1e30, "warmup_steps": 1}
    with pytest.raises(RunError) as diverged:
        _run(_cfg(stream_root, method="seq_ft", train=blowup), out, tiny_tokenizer)
    message = str(diverged.value)
    assert "at task 'colors', step 3;" in message and "--resume" in message and "\n" not in message
    first = [r for r in _log(out) if r["event"] == "step"]
    assert [np.isfinite(r["loss"]) for r in first] == [True, True, False]
    assert not os.path.exists(out / "results.json")

    results = _run(_cfg(stream_root, method="seq_ft", train=dict(blowup, lr=1e-2)), out, tiny_tokenizer,
                   resume=True, allow_changed=("train.lr",))
    steps = [r for r in _log(out) if r["event"] == "step"]
    assert [(r["phase"], r["step"]) for r in steps] == [(p, s) for p in range(2) for s in range(1, 5)]
    assert all(np.isfinite(r["loss"]) for r in steps)
    # resumed from the checkpoint after update 1 (step 1's line is kept, step 2 runs again, alike)
    assert steps[0] == first[0] and steps[1]["loss"] == first[1]["loss"]
    assert np.isfinite(results["metrics"]["AP"])


def test_an_epoch_counts_current_task_rows_when_replaying(stream_root, tmp_path, tiny_tokenizer):
    from jaxcl.data import load_stream
    from jaxcl.train.loop import make_mesh
    from jaxcl.train.pipeline import Stream

    epochs, batch, replayed = 2.0, 4, 2
    args = {"replay_fraction": replayed / batch, "replay_per_task": 4}
    cfg = jconfig.from_dict(tiny_config(stream_root, method="replay+seq_lora", method_args=args, data=TWO,
                                        eval=SMALL_EVAL, compile_cache=None,
                                        train={"steps_per_task": None, "epochs": epochs, "batch_size": batch}))
    _run(cfg, tmp_path, tiny_tokenizer)
    stream = Stream.prepare(cfg, load_stream("cl_benchmark", TWO["order"], stream_root), tiny_tokenizer, False,
                            make_mesh(cfg))
    rows = [len(t.train) for t in stream.tasks]
    steps = [sum(r["event"] == "step" and r["phase"] == p for r in _log(tmp_path)) for p in range(2)]
    # task 0 has no memory yet; task 1's batches hold batch - replayed current rows each
    assert steps == [math.ceil(rows[0] / batch) * epochs, math.ceil(rows[1] / (batch - replayed)) * epochs]
    assert steps[1] > math.ceil(rows[1] / batch) * epochs  # replay does not shorten the epoch
    # and those batches do hold that many current rows
    feed = stream.train_feed(1, [1], [0], methods.build(cfg.method, cfg.method_args).replay)
    task_ids = np.asarray(feed(0)["task_ids"]).reshape(-1)
    assert (task_ids == 1).sum() == batch - replayed and (task_ids == 0).sum() == replayed
