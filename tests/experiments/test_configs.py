"""The benchmark configs: written by experiments/write_configs.py, valid, one budget per folder."""
import glob
import os

import pytest

from jaxcl.methods import build
from jaxcl.train import config as jconfig

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments")
BENCHMARKS = ("superni_order1", "long_order4", "standard_order1")


def test_configs_are_what_the_generator_writes(scripts):
    assert scripts["write_configs"].main(["--check"]) == 0


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_every_method_loads_and_shares_the_budget(scripts, benchmark):
    paths = sorted(glob.glob(os.path.join(EXPERIMENTS, benchmark, "*.yaml")))
    configs = [jconfig.load(p) for p in paths]
    assert sorted(c.method for c in configs) == sorted(scripts["write_configs"].METHODS)
    for cfg in configs:
        build(cfg.method, cfg.method_args)  # every option name and type is one the method knows
        assert cfg.model.startswith("gguf:") and cfg.dtype == "bfloat16"
    budgets = {repr((c.data, c.train, c.eval)) for c in configs}
    assert len(budgets) == 1, "every method of a benchmark must get the same data, schedule and evaluation"


ALL_CONFIGS = sorted(glob.glob(os.path.join(EXPERIMENTS, "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: os.path.relpath(p, EXPERIMENTS))
def test_every_experiment_config_loads_and_builds_its_method(path):
    # An ablation config with a misspelt option fails on the GPU after minutes of set-up; here it fails at once.
    cfg = jconfig.load(path)
    build(cfg.method, cfg.method_args)
