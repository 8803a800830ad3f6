"""Every ``Examples:`` block in jaxcl's docstrings runs and prints what it shows."""
import doctest
import importlib
import pathlib

import pytest

import jaxcl

ROOT = pathlib.Path(jaxcl.__file__).parent
MODULES = sorted("jaxcl." + ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                 for p in ROOT.rglob("*.py") if ">>>" in p.read_text())


def test_the_examples_are_found():
    assert "jaxcl.methods.sapt" in MODULES and "jaxcl.train.config" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result
