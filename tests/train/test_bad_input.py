"""Bad input through ``jaxcl run``: one line on stderr, exit status 2, nothing written."""
import os
import shutil
import struct

import pytest
import yaml

from jaxcl import cli

from tiny_cl import tiny_config


def _main(tmp_path, capsys, cfg: dict, *extra):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(dict(cfg, compile_cache=None)))
    out = tmp_path / "out"
    code = cli.main(["run", str(path), "--out", str(out), *extra])
    err = capsys.readouterr().err
    return code, err, out


def _assert_refused(code, err, out, message):
    assert code == 2
    assert err.startswith("jaxcl: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not os.path.exists(out)  # nothing written, not even the folder


@pytest.mark.parametrize("section, values, message", [
    ("train", {"grad_accum": 0}, "train.grad_accum: expected an integer >= 1, got 0"),
    ("train", {"lr": -1e-3}, "train.lr: expected a learning rate > 0, got -0.001"),
    ("train", {"lr": float("nan")}, "train.lr: expected a learning rate > 0, got nan"),
    ("train", {"steps_per_task": 0}, "train.steps_per_task: expected an integer >= 1 or null"),
    ("train", {"steps_per_task": None, "epochs": 0}, "train.epochs: expected a number > 0, got 0.0"),
    ("train", {"checkpoint_every": -1}, "train.checkpoint_every: expected an integer >= 0"),
    ("eval", {"max_new_tokens": 0}, "eval.max_new_tokens: expected an integer >= 1, got 0"),
    ("data", {"order": ["colors", 3]}, "data.order: expected an order name or a non-empty list of task names"),
    ("eval", {"metric": "bleu"}, "eval.metric: expected null or one of ['em', 'accuracy', 'rouge_l', 'edit_sim']"),
    ("data", {"order": []}, "data.order: expected an order name or a non-empty list of task names"),
])
def test_out_of_range_config_field(stream_root, tmp_path, capsys, section, values, message):
    code, err, out = _main(tmp_path, capsys, tiny_config(stream_root, **{section: values}))
    _assert_refused(code, err, out, message)


def test_mesh_the_machine_cannot_make(stream_root, tmp_path, capsys):
    code, err, out = _main(tmp_path, capsys, tiny_config(stream_root, mesh={"data": 1024}))
    _assert_refused(code, err, out, "needs 1024 devices")


@pytest.mark.parametrize("method, args, message", [
    ("seq_lora", {"sites": ["attn.nope"]}, "method sites ['attn.nope'] match no site of this model"),
    ("any_ssr", {"feature_layers": 5}, "feature_layers=5 leaves no layer for the LoRAs"),
])
def test_method_that_does_not_fit_the_model(stream_root, tiny_model_dir, tmp_path, capsys, method, args, message):
    cfg = tiny_config(stream_root, model=tiny_model_dir, method=method, method_args=args)
    code, err, out = _main(tmp_path, capsys, cfg)
    _assert_refused(code, err, out, message)


@pytest.mark.parametrize("header", [b"[1, 2]", b'{"embed": {"dtype": "F32"}}', b'{"embed": {"dtype": "F32", "shape": "x", '
                                    b'"data_offsets": [0, 4]}}'])
def test_malformed_safetensors_header(stream_root, tiny_model_dir, tmp_path, capsys, header):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    code, err, out = _main(tmp_path, capsys, tiny_config(stream_root, model=str(broken)))
    _assert_refused(code, err, out, "model.safetensors")


def test_allow_changed_needs_resume(stream_root, tmp_path, capsys):
    code, err, out = _main(tmp_path, capsys, tiny_config(stream_root), "--allow-changed", "train.lr")
    _assert_refused(code, err, out, "--allow-changed only applies with --resume")


def test_resume_with_a_changed_config_through_the_cli(stream_root, tiny_model_dir, tmp_path, capsys):
    small = dict(model=tiny_model_dir, data={"order": ["colors"]}, eval={"max_test_per_task": 4, "batch_size": 4},
                 train={"steps_per_task": 1, "batch_size": 4, "lr": 1e-2})
    code, _, out = _main(tmp_path, capsys, tiny_config(stream_root, **small))
    assert code == 0 and (out / "results.json").exists()
    before = (out / "results.json").read_bytes()
    changed = tiny_config(stream_root, **dict(small, train=dict(small["train"], lr=1e-3)))
    code, err, _ = _main(tmp_path, capsys, changed, "--resume")
    assert code == 2 and err.count("\n") == 1 and "train.lr: 0.01 -> 0.001" in err
    assert (out / "results.json").read_bytes() == before  # refused before anything was written
    code, _, _ = _main(tmp_path, capsys, changed, "--resume", "--allow-changed", "train.lr")
    assert code == 0
