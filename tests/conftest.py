"""Fixtures shared by the engine and method tests (the helpers themselves live in tiny_cl.py)."""
from __future__ import annotations

import os

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (CI must not pass or fail by luck);
# HYPOTHESIS_PROFILE=explore draws new ones, to look for counterexamples on purpose.
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

# Every test converts its GGUF files itself (a cached conversion would hide the code under test);
# the cache's own tests turn it on in a temporary folder.
os.environ.setdefault("JAXCL_MODEL_CACHE", "off")

from tiny_cl import TASKS, tiny_llama, word_tokenizer, write_stream


@pytest.fixture(scope="session")
def stream_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("stream"))
    write_stream(root)
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer(stream_root):
    from jaxcl.data import load_stream

    tasks = load_stream("cl_benchmark", list(TASKS), stream_root)
    texts = [e.prompt + " " + e.answer for t in tasks for e in t.train + t.test]
    return word_tokenizer(texts)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    """A fresh ``(model, tokenizer)`` (models are mutable NNX objects: one per test)."""
    return tiny_llama(len(tiny_tokenizer)), tiny_tokenizer
