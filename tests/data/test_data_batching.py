import re

import numpy as np
import pytest
from char_tokenizer import CharTokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcl.data import (
    DataError,
    Example,
    TokenizedExample,
    bucket_lengths,
    collate_train,
    epoch_batches,
    eval_batches,
    make_batch_spec,
    memory_indices,
    replay_batch,
    steps_per_epoch,
    tokenize_example,
    tokenize_examples,
    train_batch,
    train_buckets,
    train_indices,
)
from jaxcl.data.tokenization import truncate_middle

DEC = make_batch_spec(CharTokenizer(), "decoder", 64, 8, bucket_multiple=16)
S2S = make_batch_spec(CharTokenizer(add_eos=True), "seq2seq", 64, 8, bucket_multiple=16)


def _ids(text):
    return [ord(c) + 3 for c in text]


def _rows(lengths, seed=0):
    """Tokenized rows with random ids: ``lengths`` is a list of (prompt_len, answer_len)."""
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(3, 99, n, dtype=np.int32)  # noqa: E731
    return [TokenizedExample(ids(p), np.append(ids(a - 1), np.int32(2))) for p, a in lengths]


row_lengths = st.lists(st.tuples(st.integers(1, 64), st.integers(1, 8)), min_size=1, max_size=6)


# --- tokenization -----------------------------------------------------------------------------------


def test_decoder_answer_gets_one_leading_space_and_eos():
    tok = tokenize_example(Example("Q\nAnswer:", "cold"), CharTokenizer(), DEC)
    assert tok.prompt.tolist() == _ids("Q\nAnswer:")
    assert tok.answer.tolist() == _ids(" cold") + [2]
    # A prompt ending in a space (SuperNI's "Output: ") hands that space to the answer; the text is unchanged.
    tok = tokenize_example(Example("Output: ", "POS"), CharTokenizer(), DEC)
    assert (tok.prompt.tolist(), tok.answer.tolist()) == (_ids("Output:"), _ids(" POS") + [2])
    # Any other trailing whitespace stays in the prompt, and no space is added.
    tok = tokenize_example(Example("Q\n", "POS"), CharTokenizer(), DEC)
    assert (tok.prompt.tolist(), tok.answer.tolist()) == (_ids("Q\n"), _ids("POS") + [2])
    # Encoder-decoder targets are the bare answer.
    target = tokenize_example(Example("Answer:", "cold"), CharTokenizer(add_eos=True), S2S).answer
    assert target.tolist() == _ids("cold") + [2]


class SentencePieceLike:
    """Splits ``"▁" + text`` (spaces as "▁") into "▁"-led pieces, like a Llama-2 tokenizer."""

    eos_token_id, pad_token_id = 2, 0

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=True):
        if isinstance(text, list):  # a batch, as HF tokenizers take one
            return {"input_ids": [self(t, add_special_tokens)["input_ids"] for t in text]}
        pieces = re.findall(r"▁*[^▁]+|▁+", "▁" + text.replace(" ", "▁"))
        return {"input_ids": [self.vocab.setdefault(p, len(self.vocab) + 3) for p in pieces]}


def test_answer_tokens_are_those_of_running_text():
    tokenizer = SentencePieceLike()
    spec = make_batch_spec(tokenizer, "decoder", 32, 4)
    tok = tokenize_example(Example("x\nAnswer:", "cold"), tokenizer, spec)
    assert tok.answer.tolist() == [tokenizer.vocab["▁cold"], 2]
    assert "▁▁cold" not in tokenizer.vocab  # a separately encoded " cold" would have given this piece
    # "Output: " + "POS" is cut as "Output:" | " POS": no lone "▁" piece ends the prompt.
    tok = tokenize_example(Example("Output: ", "POS"), tokenizer, spec)
    assert tok.prompt.tolist() == [tokenizer.vocab["▁Output:"]]
    assert tok.answer.tolist() == [tokenizer.vocab["▁POS"], 2]
    assert "▁" not in tokenizer.vocab


def test_default_special_tokens_are_detected():
    llama_like = make_batch_spec(CharTokenizer(add_bos=True, add_eos=True), "decoder", 32, 4)
    assert llama_like.prompt_prefix == (1,) and llama_like.prompt_suffix == ()  # no EOS before the answer
    prompt = tokenize_example(Example("hi", "x"), CharTokenizer(add_bos=True), llama_like).prompt
    assert prompt.tolist() == [1] + _ids("hi")
    assert S2S.prompt_prefix == () and S2S.prompt_suffix == (2,) and S2S.decoder_start_id == 0
    assert tokenize_example(Example("hi", "x"), CharTokenizer(add_eos=True), S2S).prompt.tolist() == _ids("hi") + [2]
    assert DEC.prompt_prefix == DEC.prompt_suffix == ()


def test_pad_falls_back_to_eos():
    assert make_batch_spec(CharTokenizer(pad_token_id=None), "decoder", 32, 4).pad_id == 2


def test_long_prompt_keeps_start_and_answer_cue():
    spec = make_batch_spec(CharTokenizer(add_bos=True), "decoder", 21, 3)
    prompt = "Task:TC\n" + "x" * 100 + "\nAnswer:"
    tok = tokenize_example(Example(prompt, "a long answer"), CharTokenizer(add_bos=True), spec)
    assert len(tok.prompt) == 21 and tok.prompt[0] == 1
    assert tok.prompt[1:11].tolist() == _ids(prompt[:10])  # head: 20 - 20 // 2 = 10 ids
    assert tok.prompt[-10:].tolist() == _ids(prompt[-10:])  # tail keeps "...\nAnswer:"
    assert tok.answer.tolist() == _ids(" a") + [2]  # answer cut at the end, EOS kept


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 9), max_size=30), st.integers(1, 12))
def test_truncate_middle(ids, limit):
    out = truncate_middle(ids, limit)
    assert len(out) == min(len(ids), limit)
    if len(ids) > limit:
        assert out == ids[: limit - limit // 2] + ids[len(ids) - limit // 2 :]


@pytest.mark.parametrize("kwargs", [{"kind": "rnn"}, {"max_answer_len": 0}])
def test_bad_batch_spec(kwargs):
    args = {"kind": "decoder", "max_prompt_len": 16, "max_answer_len": 4, **kwargs}
    with pytest.raises(DataError):
        make_batch_spec(CharTokenizer(), **args)


# --- collation --------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(row_lengths, st.integers(0, 2**16))
def test_decoder_loss_mask_covers_exactly_answer_and_eos(lengths, seed):
    rows = _rows(lengths, seed)
    batch = collate_train(rows, np.ones(len(rows), bool), DEC)
    length = batch["input_ids"].shape[1]
    longest = max(p + a for p, a in lengths)
    assert length in train_buckets(DEC) and length == min(b for b in train_buckets(DEC) if b >= longest)
    for b, row in enumerate(rows):
        n, p = len(row.prompt) + len(row.answer), len(row.prompt)
        assert batch["input_ids"][b, :n].tolist() == row.prompt.tolist() + row.answer.tolist()
        assert (batch["input_ids"][b, n:] == DEC.pad_id).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (length - n)
        assert np.flatnonzero(batch["loss_mask"][b]).tolist() == list(range(p, n))
        assert batch["input_ids"][b, batch["loss_mask"][b] > 0].tolist() == row.answer.tolist()
        assert batch["position_ids"][b].tolist() == list(range(length))
    assert batch["loss_mask"].dtype == np.float32 and batch["input_ids"].dtype == np.int32


@settings(max_examples=60, deadline=None)
@given(row_lengths, st.integers(0, 2**16))
def test_seq2seq_shift_right(lengths, seed):
    rows = _rows(lengths, seed)
    real = np.arange(len(rows)) % 2 == 0
    batch = collate_train(rows, real, S2S)
    labels = batch["labels"]
    assert batch["input_ids"].shape[1] in bucket_lengths(64, 16)
    assert labels.shape[1] in bucket_lengths(8, 16) == (8,)
    assert (batch["decoder_input_ids"][:, 0] == S2S.decoder_start_id).all()
    assert (batch["decoder_input_ids"][:, 1:] == labels[:, :-1]).all()
    for b, row in enumerate(rows):
        a = len(row.answer)
        assert labels[b, :a].tolist() == row.answer.tolist() and (labels[b, a:] == S2S.pad_id).all()
        assert batch["decoder_mask"][b].tolist() == [1] * a + [0] * (labels.shape[1] - a)
        assert batch["loss_mask"][b].sum() == (a if real[b] else 0)
        assert batch["input_ids"][b, : len(row.prompt)].tolist() == row.prompt.tolist()


def test_eval_batches_left_pad_decoder_and_keep_order():
    examples = [Example("a" * n, "x") for n in (3, 20, 7, 1, 5)]
    tokenized = tokenize_examples(examples, CharTokenizer(), DEC)
    seen = []
    for indices, batch in eval_batches(tokenized, 2, DEC):
        assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] in bucket_lengths(64, 16)
        for row, i in enumerate(indices):
            n = len(tokenized[i].prompt)
            assert batch["input_ids"][row, -n:].tolist() == tokenized[i].prompt.tolist()  # left padded
            width = batch["input_ids"].shape[1]
            assert batch["attention_mask"][row].tolist() == [0] * (width - n) + [1] * n
            assert batch["position_ids"][row, -n:].tolist() == list(range(n))
        seen += indices.tolist()
    assert seen == [0, 1, 2, 3, 4]
    last_indices, last = list(eval_batches(tokenized, 2, DEC))[-1]
    assert last_indices.tolist() == [4] and (last["input_ids"][0] == last["input_ids"][1]).all()  # filler row


def test_eval_batches_right_pad_seq2seq():
    tokenized = tokenize_examples([Example("abc", "x"), Example("a" * 17, "y")], CharTokenizer(add_eos=True), S2S)
    (indices, batch), = list(eval_batches(tokenized, 4, S2S))
    assert indices.tolist() == [0, 1] and batch["input_ids"].shape == (4, 32)
    assert batch["input_ids"][0, :4].tolist() == _ids("abc") + [2] and batch["attention_mask"][0].sum() == 4
    assert "position_ids" not in batch


def test_row_longer_than_buckets_is_an_error():
    with pytest.raises(DataError, match="exceeds the largest bucket"):
        collate_train(_rows([(70, 8)]), np.ones(1, bool), DEC)


# --- stateless sampler ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.integers(1, 9), st.integers(0, 2**31), st.integers(0, 3), st.integers(1, 4))
def test_each_epoch_covers_every_example_once(n, batch_size, seed, epoch, chunk):
    lengths = np.random.default_rng(seed).integers(1, 50, n)
    indices, real = epoch_batches(lengths, batch_size, seed, epoch, chunk)
    assert indices.shape == real.shape == (steps_per_epoch(n, batch_size), batch_size)
    assert sorted(indices[real].tolist()) == list(range(n))
    assert real.sum() == n
    # Filler rows repeat examples of their own batch, so they never lengthen it.
    for batch, mask in zip(indices, real):
        assert set(batch[~mask]) <= set(batch[mask])
    steps = steps_per_epoch(n, batch_size)
    by_step = [train_indices(lengths, batch_size, seed, epoch * steps + k, chunk)[0] for k in range(steps)]
    assert np.array_equal(np.stack(by_step), indices)


def test_train_batch_is_a_pure_function_of_seed_and_step():
    rows = _rows([(p, a) for p, a in zip(range(5, 45), [1, 2, 3, 4] * 10)])
    first = [train_batch(rows, 4, seed=7, step=s, spec=DEC) for s in range(25)]
    again = [train_batch(rows, 4, seed=7, step=s, spec=DEC) for s in reversed(range(25))][::-1]  # any call order
    for a, b in zip(first, again):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    other_seed = [train_batch(rows, 4, seed=8, step=s, spec=DEC)["input_ids"] for s in range(10)]
    assert any(x.shape != y.shape or (x != y).any() for x, y in zip(other_seed, (f["input_ids"] for f in first)))
    epoch0 = np.concatenate([train_indices([len(r.prompt) + 1 for r in rows], 4, 7, s)[0] for s in range(10)])
    epoch1 = np.concatenate([train_indices([len(r.prompt) + 1 for r in rows], 4, 7, s)[0] for s in range(10, 20)])
    assert sorted(epoch0) == sorted(epoch1) == list(range(40)) and (epoch0 != epoch1).any()


def test_length_bucketing_groups_similar_lengths():
    lengths = np.random.default_rng(0).permutation(64)
    indices, _ = epoch_batches(lengths, 8, seed=1, epoch=0, chunk_batches=8)
    # One chunk holds the whole epoch, so every batch is a run of 8 consecutive lengths.
    spans = sorted((lengths[b].min(), lengths[b].max()) for b in indices)
    assert spans == [(8 * k, 8 * k + 7) for k in range(8)]


def test_filler_rows_have_no_loss():
    rows = _rows([(4, 2)] * 5)
    batches = [train_batch(rows, 4, seed=0, step=s, spec=DEC) for s in range(2)]
    assert sorted(int(b["loss_mask"].sum()) for b in batches) == [2, 8]  # 5 examples x 2 answer tokens
    assert all(b["input_ids"].shape == (4, 16) for b in batches)


def test_replay_batch_mixes_memory_rows():
    current, memory = _rows([(10, 2)] * 12, seed=1), _rows([(30, 3)] * 5, seed=2)
    batch = replay_batch(current, memory, 8, 0.25, seed=3, step=4, spec=DEC)
    assert batch["input_ids"].shape[0] == 8
    assert (batch["loss_mask"].sum(axis=1) == [2] * 6 + [3] * 2).all()  # 6 current rows, then 2 replayed
    memory_prompts = {tuple(r.prompt) for r in memory}
    assert all(tuple(batch["input_ids"][b, :30]) in memory_prompts for b in (6, 7))
    again = replay_batch(current, memory, 8, 0.25, seed=3, step=4, spec=DEC)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    plain = replay_batch(current, [], 8, 0.25, seed=3, step=4, spec=DEC)  # empty memory: no replay
    assert all(np.array_equal(plain[k], train_batch(current, 8, 3, 4, DEC)[k]) for k in plain)
    with pytest.raises(DataError, match="replay_fraction"):
        replay_batch(current, memory, 8, 1.0, seed=3, step=4, spec=DEC)


def test_memory_indices():
    picked = memory_indices(100, 10, seed=5)
    assert len(set(picked.tolist())) == 10 and picked.tolist() == sorted(picked.tolist())
    assert np.array_equal(picked, memory_indices(100, 10, seed=5))
    assert memory_indices(3, 10, seed=5).tolist() == [0, 1, 2]
