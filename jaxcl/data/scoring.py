"""Scoring generated answers: exact match, ROUGE-L and edit similarity, reported in %.

Every metric compares one prediction with one gold string; with several gold references a
prediction gets its best score over them (SuperNI's convention).
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Sequence

import numpy as np

from jaxcl.data.task import METRICS, DataError

ANSWER_CUE = "Answer:"
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower-cases, removes ASCII punctuation and collapses runs of whitespace."""
    return " ".join(_PUNCTUATION.sub("", text.lower()).split())


def extract_answer(generated_text: str, cue: str = ANSWER_CUE) -> str:
    """Keeps the text after the last ``cue`` (decoder-only outputs may echo the prompt), stripped."""
    return generated_text.rpartition(cue)[2].strip()


def exact_match(pred: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer  # the maintained Google package, imported on first use

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(pred: str, gold: str) -> float:
    """ROUGE-L F-measure in [0, 1] from ``rouge-score`` (Porter stemming, its default tokenizer).

    This is SAPT's SuperNI metric (``src/compute_metrics.py``, from Super-NaturalInstructions):
    ``rougeL`` over the whole text (not ``rougeLsum``, which splits at newlines), Porter stemming of
    words over 3 characters, no other normalisation (the tokenizer lower-cases and keeps only
    ``[a-z0-9]`` runs, so non-ASCII letters are dropped, as in SAPT's default track), averaged x 100
    by :func:`score`.
    """
    return _rouge_scorer().score(gold, pred)["rougeL"].fmeasure


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insertions, deletions, substitutions all cost 1).

    Dynamic programming one row at a time; the insertion chain within a row is a running minimum
    of ``d[j] - j``, so each row is a few vectorised numpy operations.
    """
    if not a or not b:
        return max(len(a), len(b))
    b_codes = np.array([ord(c) for c in b])
    offsets = np.arange(len(b) + 1)
    row = offsets.copy()
    for i, char in enumerate(a, start=1):
        cost = (b_codes != ord(char)).astype(np.int64)
        cand = np.empty_like(row)
        cand[0] = i
        cand[1:] = np.minimum(row[1:] + 1, row[:-1] + cost)  # deletion, substitution / match
        row = np.minimum.accumulate(cand - offsets) + offsets  # insertion
    return int(row[-1])


def edit_similarity(pred: str, gold: str) -> float:
    """``1 - levenshtein(pred, gold) / max(len(pred), len(gold))``; 1.0 for two empty strings."""
    longest = max(len(pred), len(gold))
    return 1.0 if longest == 0 else 1.0 - levenshtein(pred, gold) / longest


# "accuracy" is exact match under the name TRACE uses for its label-prediction tasks.
_METRIC_FNS = {"em": exact_match, "accuracy": exact_match, "rouge_l": rouge_l, "edit_sim": edit_similarity}


def score(metric: str, preds: Sequence[str], golds: Sequence[str | Sequence[str]]) -> float:
    """Mean score in % of ``preds`` against ``golds`` (a string or a list of references each).

    Args:
      metric: one of ``"em"``, ``"accuracy"``, ``"rouge_l"``, ``"edit_sim"``.
      preds: predictions, already passed through :func:`extract_answer` where needed.
      golds: one gold string, or a non-empty sequence of references, per prediction.

    Returns:
      A float in [0, 100].
    """
    if metric not in _METRIC_FNS:
        raise DataError(f"unknown metric {metric!r}; known: {list(METRICS)}")
    if len(preds) != len(golds):
        raise DataError(f"score: {len(preds)} predictions but {len(golds)} gold answers")
    if not preds:
        raise DataError("score: no predictions to score")
    fn = _METRIC_FNS[metric]
    total = 0.0
    for pred, gold in zip(preds, golds):
        references = (gold,) if isinstance(gold, str) else tuple(gold)
        if not references:
            raise DataError("score: a gold entry has no references")
        total += max(fn(pred, ref) for ref in references)
    return 100.0 * total / len(preds)
