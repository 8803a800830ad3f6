"""results.json and config.json reach the disk before their name points at them."""
import json
import os

import pytest

from jaxcl.train import checkpoint


def test_json_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "results.json"
    checkpoint.write_json_atomic(str(path), {"matrix": [[1.0]]})
    (fsynced, tmp), (replaced, src, dst), (dir_fsync, directory) = events
    assert (fsynced, replaced, dir_fsync) == ("fsync", "replace", "fsync")
    assert tmp == src != dst == str(path) and directory == str(tmp_path)
    assert json.loads(path.read_text()) == {"matrix": [[1.0]]}
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    checkpoint.write_json_atomic(str(path), {"old": 1})
    with pytest.raises(TypeError):
        checkpoint.write_json_atomic(str(path), {"bad": object()})
    assert json.loads(path.read_text()) == {"old": 1} and os.listdir(tmp_path) == ["results.json"]
