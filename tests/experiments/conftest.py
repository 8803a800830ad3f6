"""Imports the experiment scripts (experiments/ is a folder of scripts, not a package)."""
from __future__ import annotations

import importlib.util
import os

import pytest

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def scripts():
    return {name: load_script(name) for name in ("run_benchmark", "summarize", "write_configs")}
