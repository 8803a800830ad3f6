"""TensorBoard events: a tiny 2-task run's event file holds log.jsonl's numbers under their tags, the
metrics and the accuracy-matrix image; ``tensorboard: false`` writes none."""
import glob
import json
import os
import shutil
import struct

import pytest

from jaxcl.train import config as jconfig
from jaxcl.train.loop import run

from tiny_cl import TASKS, tiny_config, tiny_llama

TWO = list(TASKS)[:2]


def _read_events(folder):
    """Every event of the event files in ``folder`` (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
            at += 12 + length + 4
    return events


def _scalars(folder):
    """``{tag: [(step, value)]}`` as TensorBoard shows them: a writer's restart at step p (a
    ``SessionLog.START`` event) drops the events at steps >= p written before it."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for event in _read_events(folder):
        if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
            scalars = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in scalars.items()}
        for v in event.summary.value:
            if not v.HasField("image"):
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


def _config(stream_root, train_extra=(), **overrides):
    train = {"steps_per_task": 3, "batch_size": 4, "lr": 1e-2, "schedule": "warmup_cosine", "warmup_steps": 1}
    return jconfig.from_dict(tiny_config(stream_root, method="seq_lora", data={"order": TWO},
                                         train=dict(train, **dict(train_extra)), **overrides))


def _run(stream_root, out, tiny_model, **overrides):
    return run(_config(stream_root, **overrides), str(out), model_and_tokenizer=tiny_model, progress=False)


def test_event_file_scalars_equal_the_log(stream_root, tmp_path, tiny_model):
    results = _run(stream_root, tmp_path, tiny_model)
    with open(tmp_path / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    scalars, images = {}, set()
    for event in _read_events(tmp_path / "tensorboard"):
        for v in event.summary.value:
            if v.HasField("image"):
                images.add(v.tag)
            else:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))

    steps = [r for r in log if r["event"] == "step"]
    assert len(steps) == 6
    for name in ("loss", "ce", "lr"):
        assert [s for s, _ in scalars[f"train/{name}"]] == list(range(1, 7))
        assert [v for _, v in scalars[f"train/{name}"]] == pytest.approx([r[name] for r in steps], rel=1e-6)
    # warm-up then cosine per task: the lr is the schedule's, restarting with each task
    assert [r["lr"] for r in steps[:3]] == [r["lr"] for r in steps[3:]] and steps[0]["lr"] == 0.0

    evals = [r for r in log if r["event"] == "eval"]
    assert [r["after"] for r in evals] == ["base", *TWO]
    for j, task in enumerate(TWO):
        # at the global step of the evaluation: the base model at 0, then the last step of each task
        assert scalars[f"eval/{task}"] == [(s, pytest.approx(r["scores"][j], rel=1e-6))
                                           for s, r in zip((0, 3, 6), evals)]
    assert not any(tag.startswith("routing/") for tag in scalars)  # seq_lora does not route
    assert scalars["metrics/AP"] == [(6, pytest.approx(results["metrics"]["AP"], rel=1e-6))]
    assert images == {"accuracy_matrix"}


def test_tensorboard_off_writes_no_events(stream_root, tmp_path, tiny_model):
    _run(stream_root, tmp_path, tiny_model, tensorboard=False)
    assert not (tmp_path / "tensorboard").exists() and (tmp_path / "results.json").exists()


def test_resumed_run_events_equal_an_uninterrupted_runs(stream_root, tmp_path, tiny_tokenizer):
    from jaxcl.train.loop import Interrupted

    every = {"checkpoint_every": 1}
    full = tmp_path / "full"
    _run(stream_root, full, (tiny_llama(len(tiny_tokenizer)), tiny_tokenizer), train_extra=every)
    killed = tmp_path / "killed"
    cfg = _config(stream_root, train_extra=every)
    with pytest.raises(Interrupted):
        run(cfg, str(killed), model_and_tokenizer=(tiny_llama(len(tiny_tokenizer)), tiny_tokenizer), progress=False,
            stop_after_steps=5)
    # as if killed after logging steps 4 and 5: the newest checkpoint (after step 5) was never written
    checkpoints = sorted(int(n) for n in os.listdir(killed / "checkpoints") if n.isdigit())
    shutil.rmtree(killed / "checkpoints" / str(checkpoints[-1]))
    run(cfg, str(killed), model_and_tokenizer=(tiny_llama(len(tiny_tokenizer)), tiny_tokenizer), progress=False,
        resume=True)
    ours, theirs = _scalars(killed / "tensorboard"), _scalars(full / "tensorboard")
    assert sorted(ours) == sorted(theirs)
    for tag in theirs:
        assert [s for s, _ in ours[tag]] == [s for s, _ in theirs[tag]], tag
        if tag != "train/seconds":
            assert [v for _, v in ours[tag]] == pytest.approx([v for _, v in theirs[tag]], rel=1e-5), tag
