"""Tests of jaxcl.kernels.metrics: hand-checked matrices and properties of random ones."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcl.kernels import metrics

# Row i = after training task i, column j = task j (scores in %).
A = [
    [80.0, 10.0, 20.0],
    [70.0, 85.0, 30.0],
    [60.0, 75.0, 90.0],
]
B = [5.0, 8.0, 25.0]


def test_hand_checked_3x3():
    assert metrics.average_performance(A) == pytest.approx((60 + 75 + 90) / 3)
    assert metrics.backward_transfer(A) == pytest.approx(((60 - 80) + (75 - 85)) / 2)
    assert metrics.backward_transfer(A, sapt_compat=True) == pytest.approx(((60 - 80) + (75 - 85)) / 3)
    assert metrics.forward_transfer(A, B) == pytest.approx(((10 - 8) + (30 - 25)) / 2)
    # task 0: best 80 (row 0) -> 60; task 1: best 85 -> 75
    assert metrics.forgetting(A) == pytest.approx(((80 - 60) + (85 - 75)) / 2)
    assert metrics.summarize(A, B) == pytest.approx({"AP": 75.0, "BWT": -15.0, "FWT": 3.5, "forgetting": 15.0})


def test_forgetting_counts_only_rows_after_the_task_was_learned():
    a = np.array(A)
    a[0, 1] = 99.0  # a zero-shot score above what task 1 reached once trained is not "forgotten"
    assert metrics.forgetting(a) == pytest.approx(15.0)
    a = np.array(A)
    a[1, 0] = 95.0  # a later peak on task 0 counts
    assert metrics.forgetting(a) == pytest.approx(((95 - 60) + (85 - 75)) / 2)


def test_single_task_and_missing_base_scores():
    assert metrics.summarize([[42.0]], [10.0]) == {"AP": 42.0, "BWT": 0.0, "FWT": 0.0, "forgetting": 0.0}
    assert metrics.summarize(A)["FWT"] is None


def test_unevaluated_entries_may_be_nan_where_unused():
    a = np.array(A)
    a[0, 2] = np.nan  # a[0][2] is read by no metric
    assert metrics.summarize(a, B) == pytest.approx(metrics.summarize(A, B))


@pytest.mark.parametrize(
    "bad, b, match",
    [
        ([1.0, 2.0], None, "square"),
        ([[1.0, 2.0]], None, "square"),
        (np.zeros((0, 0)), None, "T >= 1"),
        ([["x", "y"], ["z", "w"]], None, "numbers"),
        ([[1.0, 2.0], [float("nan"), 3.0]], None, "last row"),
        (A, [1.0, 2.0], "one entry per task"),
        ([[1.0, float("inf")], [2.0, 3.0]], [0.0, 0.0], "superdiagonal"),
    ],
)
def test_bad_input_raises_one_clear_error(bad, b, match):
    with pytest.raises(ValueError, match=match):
        metrics.summarize(bad, b)


matrices = st.integers(1, 7).flatmap(
    lambda t: st.lists(st.lists(st.floats(0, 100), min_size=t, max_size=t), min_size=t, max_size=t)
)


@settings(max_examples=60, deadline=None)
@given(a=matrices)
def test_properties_of_random_matrices(a):
    m = np.array(a)
    t = m.shape[0]
    bwt, fgt = metrics.backward_transfer(m), metrics.forgetting(m)
    assert metrics.average_performance(m) == pytest.approx(m[-1].mean())
    # SAPT's score.py divides by T: its BWT is (T-1)/T of the standard one.
    assert metrics.backward_transfer(m, sapt_compat=True) == pytest.approx(bwt * (t - 1) / t, abs=1e-9)
    # The best past score is at least the score right after training, so forgetting >= -BWT.
    assert fgt >= -bwt - 1e-9
    # FWT against the model's own zero-shot scores is 0; shifting the base scores shifts FWT.
    zero_shot = [m[j - 1, j] if j else 0.0 for j in range(t)]
    assert metrics.forward_transfer(m, zero_shot) == pytest.approx(0.0, abs=1e-9)
    assert metrics.forward_transfer(m, np.array(zero_shot) - 3.0) == pytest.approx(3.0 if t > 1 else 0.0)


@settings(max_examples=30, deadline=None)
@given(
    learned=st.lists(st.floats(0, 100), min_size=1, max_size=7),
    gains=st.lists(st.floats(0, 10), min_size=49, max_size=49),
)
def test_no_forgetting_gives_zero_bwt_and_forgetting(learned, gains):
    t = len(learned)
    m = np.full((t, t), np.nan)
    for j in range(t):
        m[j:, j] = learned[j]  # each task keeps exactly its learned score
    for i in range(t):
        m[i, i + 1 :] = gains[i * 7 : i * 7 + t - i - 1]  # arbitrary zero-shot scores
    assert metrics.backward_transfer(m) == 0.0
    assert metrics.forgetting(m) == 0.0
    assert math.isclose(metrics.average_performance(m), float(np.mean(learned)), rel_tol=1e-12, abs_tol=1e-12)
