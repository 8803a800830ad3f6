"""Continual-learning metrics from an accuracy matrix.

``a[i][j]`` is the score (in %) on task j after training task i, for T tasks in training order
(0-indexed here; docs/metrics.md writes the same formulas 1-indexed). ``b[j]`` is the base model's score on
task j before any training. Entries a metric does not read may be NaN (e.g. an upper triangle that was
never evaluated); entries it reads must be finite.

With a single task there is nothing to transfer or forget: BWT, FWT and forgetting are then 0.0 (the
empty average is taken as 0), so results files always hold numbers.

All functions accept any array-like and return Python floats; they are host-side numpy code.
"""

from __future__ import annotations

import numpy as np


def _matrix(a) -> np.ndarray:
    try:
        m = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"metrics: accuracy matrix must be a T×T array of numbers ({err})") from None
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(
            f"metrics: accuracy matrix must be square T×T with T >= 1 (row i = after task i, column j = task j); "
            f"got shape {m.shape}"
        )
    return m


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        raise ValueError(f"metrics: {what} must be finite numbers, got {values.tolist()}")
    return values


def average_performance(a) -> float:
    """AP: mean over tasks of the scores after the last task, ``mean_j a[T-1][j]``.

    This is O-LoRA's "avg": a mean over tasks, never pooled over samples.

    Args:
      a: ``(T, T)`` accuracy matrix.

    Returns:
      AP in the units of ``a``.
    """
    m = _matrix(a)
    return float(np.mean(_finite(m[-1], "the last row (scores after the final task)")))


def backward_transfer(a, sapt_compat: bool = False) -> float:
    """BWT: ``1/(T-1) Σ_{j<T-1} (a[T-1][j] − a[j][j])`` (negative means forgetting).

    Args:
      a: ``(T, T)`` accuracy matrix.
      sapt_compat: divide by T instead of T−1, as SAPT's ``score.py`` does, when comparing with its
        tables (that value is ``(T-1)/T`` times the standard one).

    Returns:
      BWT; 0.0 when T = 1.
    """
    m = _matrix(a)
    t = m.shape[0]
    if t == 1:
        return 0.0
    last = _finite(m[-1, :-1], "the last row (scores after the final task)")
    diag = _finite(np.diag(m)[:-1], "the diagonal (score on each task right after training it)")
    return float(np.sum(last - diag) / (t if sapt_compat else t - 1))


def forward_transfer(a, b) -> float:
    """FWT: ``1/(T-1) Σ_{j>=1} (a[j-1][j] − b[j])``, zero-shot gain over the base model.

    ``a[j-1][j]`` is the score on task j just before training it.

    Args:
      a: ``(T, T)`` accuracy matrix.
      b: ``(T,)`` base model scores.

    Returns:
      FWT; 0.0 when T = 1.
    """
    m = _matrix(a)
    t = m.shape[0]
    base = np.asarray(b, dtype=np.float64)
    if base.shape != (t,):
        raise ValueError(f"metrics: base scores b must have one entry per task, shape ({t},); got {base.shape}")
    if t == 1:
        return 0.0
    before = _finite(np.diag(m, k=1), "the superdiagonal a[j-1][j] (score on task j before training it)")
    return float(np.mean(before - _finite(base[1:], "base scores b")))


def forgetting(a) -> float:
    """Average forgetting: ``1/(T-1) Σ_{j<T-1} max_{j<=l<T-1} (a[l][j] − a[T-1][j])``.

    The maximum runs over the rows after task j was trained (l >= j): a score measured before the
    model ever saw task j is not something it can forget. A maximum over all ``l<T`` agrees with it
    whenever the upper triangle is not above the learned scores, e.g. SAPT's zero-padded matrices.

    Args:
      a: ``(T, T)`` accuracy matrix.

    Returns:
      forgetting (positive means scores dropped); 0.0 when T = 1.
    """
    m = _matrix(a)
    t = m.shape[0]
    if t == 1:
        return 0.0
    _finite(m[np.tril_indices(t)], "the lower triangle with diagonal (scores on seen tasks)")
    best = np.array([np.max(m[j : t - 1, j]) for j in range(t - 1)])
    return float(np.mean(best - m[-1, :-1]))


def summarize(a, b=None, sapt_compat: bool = False) -> dict:
    """All metrics at once.

    Args:
      a: ``(T, T)`` accuracy matrix.
      b: optional ``(T,)`` base model scores; FWT is ``None`` without them.
      sapt_compat: see :func:`backward_transfer`.

    Returns:
      ``{"AP": float, "BWT": float, "FWT": float | None, "forgetting": float}``.
    """
    return {
        "AP": average_performance(a),
        "BWT": backward_transfer(a, sapt_compat=sapt_compat),
        "FWT": None if b is None else forward_transfer(a, b),
        "forgetting": forgetting(a),
    }
