"""Turning Examples into token-id arrays (numpy only, deterministic).

The tokenizer is anything HF-like: ``tokenizer(text, add_special_tokens=False)["input_ids"]``, and
the same for a list of texts (a batch: ids per text), or ``tokenizer.encode(text,
add_special_tokens=False)`` where it is not callable; ``eos_token_id`` and ``pad_token_id``
(EOS is used for padding when it is None). Text is always encoded without special tokens; the
special tokens the tokenizer adds by default are detected once (:func:`make_batch_spec`) and added
explicitly: a leading BOS (Llama-style tokenizers) goes before every prompt, and a trailing EOS
(T5-style) ends every encoder-decoder source.

Decoder-only layout: ``ids = prompt + answer + [eos]``. The answer follows the prompt after one
space unless the prompt already ends in whitespace ("Answer:" + " cold"). Trailing spaces of a
prompt are tokenized with the answer (SuperNI's "Output: " + "POS" is "Output:" | " POS"): byte-level
BPE and SentencePiece tokenizers attach a space to the word after it, so a prompt ending in a space
would end in a lone space token and the answer would start with a word piece the model never sees
after a space in running text; the text of prompt + answer is unchanged. The answer's ids are those
of the joined text past the prompt's ids (or of the answer alone when the joined ids do not start
with the prompt's), so the prompt/answer boundary is exact and the answer is tokenized as in running
text. Encoder-decoder layout: source = prompt (+ EOS if the tokenizer appends it), target = answer +
[eos].

Over-long prompts keep their first and last tokens and drop the middle: the instruction and
options sit at the start and the answer cue (``\\nAnswer:``) at the end, so both survive. Over-long
answers are cut at the end (EOS is always kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxcl.data.task import DataError, Example

KINDS = ("decoder", "seq2seq")


class BatchSpec(NamedTuple):
    """How examples become arrays for one model.

    Attributes:
      kind: ``"decoder"`` (decoder-only) or ``"seq2seq"`` (encoder-decoder, e.g. T5).
      max_prompt_len: token budget of a prompt / source, special tokens included.
      max_answer_len: token budget of an answer / target, EOS included.
      pad_id: padding token id.
      eos_id: end-of-sequence token id.
      prompt_prefix: special ids put before every prompt (e.g. ``(bos,)``).
      prompt_suffix: special ids put after every seq2seq source (e.g. ``(eos,)`` for T5).
      decoder_start_id: first decoder input of seq2seq models (T5 uses the pad id).
      bucket_multiple: padded lengths are multiples of this (or the budget itself).
    """

    kind: str
    max_prompt_len: int
    max_answer_len: int
    pad_id: int
    eos_id: int
    prompt_prefix: tuple[int, ...] = ()
    prompt_suffix: tuple[int, ...] = ()
    decoder_start_id: int | None = None
    bucket_multiple: int = 32


class TokenizedExample(NamedTuple):
    """Token ids of one example.

    Attributes:
      prompt: int32 [P], the prompt with its special tokens, P <= max_prompt_len.
      answer: int32 [A], the answer followed by EOS, 1 <= A <= max_answer_len.
    """

    prompt: np.ndarray
    answer: np.ndarray


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    if callable(tokenizer):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_many(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """``[encode(tokenizer, t) for t in texts]``, in one batch call where the tokenizer takes a list
    (a fast tokenizer encodes a batch on all cores: ~10x faster for a benchmark's few thousand rows)."""
    if not texts:
        return []
    if callable(tokenizer):
        return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    return [encode(tokenizer, t) for t in texts]


def _default_specials(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids the tokenizer adds before and after plain text by default."""
    probe = "a b"
    plain = encode(tokenizer, probe)
    if callable(tokenizer):
        full = list(tokenizer(probe)["input_ids"])
    else:
        full = list(tokenizer.encode(probe))
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tuple(full[:start]), tuple(full[start + len(plain) :])
    return (), ()


def make_batch_spec(
    tokenizer,
    kind: str,
    max_prompt_len: int,
    max_answer_len: int,
    *,
    decoder_start_id: int | None = None,
    bucket_multiple: int = 32,
) -> BatchSpec:
    """Reads EOS, padding and default special tokens off ``tokenizer``.

    Args:
      tokenizer: an HF-like tokenizer.
      kind: ``"decoder"`` or ``"seq2seq"``.
      max_prompt_len: prompt / source budget in tokens.
      max_answer_len: answer / target budget in tokens (EOS included, so >= 1).
      decoder_start_id: seq2seq only; defaults to the pad id (T5's convention).
      bucket_multiple: step of the padded-length buckets.
    """
    if kind not in KINDS:
        raise DataError(f"unknown model kind {kind!r}; known: {list(KINDS)}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = eos if pad is None else pad
    prefix, suffix = _default_specials(tokenizer)
    if max_answer_len < 1 or max_prompt_len <= len(prefix) + len(suffix) or bucket_multiple < 1:
        raise DataError(
            f"token budgets too small: max_prompt_len={max_prompt_len} (special tokens: "
            f"{len(prefix) + len(suffix)}), max_answer_len={max_answer_len}, bucket_multiple={bucket_multiple}"
        )
    if kind == "decoder":
        # A default trailing EOS would end the prompt before the answer; decoder prompts skip it.
        return BatchSpec(kind, max_prompt_len, max_answer_len, pad, eos, prefix, (), None, bucket_multiple)
    start = pad if decoder_start_id is None else decoder_start_id
    return BatchSpec(kind, max_prompt_len, max_answer_len, pad, eos, prefix, suffix, start, bucket_multiple)


def truncate_middle(ids: Sequence[int], limit: int) -> list[int]:
    """Keeps the first ``limit - limit // 2`` and the last ``limit // 2`` ids when too long."""
    ids = list(ids)
    if len(ids) <= limit:
        return ids
    tail = limit // 2
    return ids[: limit - tail] + (ids[len(ids) - tail :] if tail else [])


def tokenize_example(example: Example, tokenizer, spec: BatchSpec) -> TokenizedExample:
    """Token ids of one example under ``spec`` (see the module docstring for the layout)."""
    return tokenize_examples([example], tokenizer, spec)[0]


def _decoder_texts(prompt: str, answer: str) -> tuple[str, str]:
    """The texts a decoder-only example is cut into: ``(prompt, answer)`` whose concatenation is
    the prompt, one separating space where the prompt ends in no whitespace, and the answer; the
    prompt's trailing spaces move to the answer (see the module docstring)."""
    core = prompt.rstrip(" ")
    if core != prompt:
        return core, prompt[len(core):] + answer
    if prompt and not prompt[-1].isspace() and not answer[:1].isspace():
        return prompt, " " + answer
    return prompt, answer


def _running_text_ids(tokenizer, answer: str, prompt_ids: list[int], joined: list[int]) -> list[int]:
    """The answer's ids as they appear after the prompt in the joined text (``joined``: its ids)."""
    # The joined text gives the ids of running text (a SentencePiece tokenizer would encode a lone
    # " cold" with two spaces); when they do not start with the prompt's ids, encode the answer alone.
    if joined[: len(prompt_ids)] == prompt_ids:
        return joined[len(prompt_ids) :]
    return encode(tokenizer, answer)


def tokenize_examples(examples: Sequence[Example], tokenizer, spec: BatchSpec) -> list[TokenizedExample]:
    """Token ids of every example under ``spec``, in order (see the module docstring for the layout);
    the texts of all examples are encoded in batch calls (``encode_many``)."""
    texts = [(e.prompt, e.answer) for e in examples]
    if spec.kind == "decoder":
        texts = [_decoder_texts(p, a) for p, a in texts]
    prompts = encode_many(tokenizer, [p for p, _ in texts])
    if spec.kind == "decoder":
        joined = encode_many(tokenizer, [p + a for p, a in texts])
        answers = [_running_text_ids(tokenizer, a, p_ids, j) for (_, a), p_ids, j in zip(texts, prompts, joined)]
    else:
        answers = encode_many(tokenizer, [a for _, a in texts])
    budget = spec.max_prompt_len - len(spec.prompt_prefix) - len(spec.prompt_suffix)
    out = []
    for prompt_ids, answer_ids in zip(prompts, answers):
        prompt = list(spec.prompt_prefix) + truncate_middle(prompt_ids, budget) + list(spec.prompt_suffix)
        answer = answer_ids[: spec.max_answer_len - 1] + [spec.eos_id]
        out.append(TokenizedExample(np.asarray(prompt, np.int32), np.asarray(answer, np.int32)))
    return out
