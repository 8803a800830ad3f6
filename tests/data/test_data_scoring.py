import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcl.data import (
    METRICS,
    DataError,
    edit_similarity,
    exact_match,
    extract_answer,
    normalize_answer,
    rouge_l,
    score,
)
from jaxcl.data.scoring import _METRIC_FNS, levenshtein


def _reference_levenshtein(a, b):
    """Textbook full-table dynamic programming."""
    table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return table[-1][-1]


def test_normalize_answer():
    assert normalize_answer("  The  Sci/Tech,\tNEWS! ") == "the scitech news"
    assert normalize_answer("Sports.") == normalize_answer("sports")
    assert normalize_answer("") == ""


def test_extract_answer_keeps_text_after_last_cue():
    assert extract_answer("Task:TC\nDataset:x\nOption: a, b \nsome text\nAnswer: Sports") == "Sports"
    assert extract_answer("Answer: no\nAnswer:  yes ") == "yes"
    assert extract_answer(" World\n") == "World"  # no cue: the whole (stripped) text
    assert extract_answer("Input: x\nOutput: POS", cue="Output:") == "POS"


def test_exact_match():
    assert exact_match("Sports.", "sports") == 1.0
    assert exact_match("sport", "sports") == 0.0
    assert exact_match("Sci/Tech", "scitech") == 1.0


def test_rouge_l_sanity():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l("dogs bark loudly", "the cat sat") == 0.0
    partial = rouge_l("the cat sat", "the cat sat on the mat")
    # LCS 3 of 3 predicted and 6 gold tokens: P = 1, R = 0.5, F = 2/3.
    assert partial == pytest.approx(2 / 3)
    assert rouge_l("cats running", "cat runs") == pytest.approx(1.0)  # Porter stemming
    assert rouge_l("The CAT, sat!", "the cat sat") == pytest.approx(1.0)  # case and punctuation ignored


def test_rouge_l_is_over_the_whole_text_not_per_line():
    # SAPT scores rougeL: one LCS over all tokens ("a b" here: F = 2/4); rougeLsum would match the
    # two lines separately and give 1.
    assert rouge_l("a b\nc d", "c d\na b") == pytest.approx(0.5)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="abcé ", max_size=12), st.text(alphabet="abcé ", max_size=12))
def test_levenshtein_matches_reference(a, b):
    assert levenshtein(a, b) == _reference_levenshtein(a, b)
    assert levenshtein(a, b) == levenshtein(b, a)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=15), st.text(max_size=15))
def test_edit_similarity_bounds(a, b):
    sim = edit_similarity(a, b)
    assert 0.0 <= sim <= 1.0
    assert (sim == 1.0) == (a == b)


def test_edit_similarity_values():
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("", "abc") == 0.0


def test_score_in_percent_with_references():
    assert score("em", ["Sports", "world", "x"], ["sports", "World", "y"]) == pytest.approx(200 / 3)
    # Several references: the best one counts.
    assert score("em", ["negative"], [("NEG", "negative")]) == 100.0
    assert score("accuracy", ["A"], ["B"]) == 0.0
    assert score("edit_sim", ["abcd"], ["abce"]) == pytest.approx(75.0)
    assert score("rouge_l", ["the cat"], ["the cat"]) == pytest.approx(100.0)


def test_every_metric_has_a_function():
    assert set(_METRIC_FNS) == set(METRICS)


@pytest.mark.parametrize(
    "args, message",
    [
        (("bleu", ["a"], ["a"]), "unknown metric 'bleu'"),
        (("em", ["a"], ["a", "b"]), "1 predictions but 2 gold"),
        (("em", [], []), "no predictions"),
        (("em", ["a"], [()]), "no references"),
    ],
)
def test_score_bad_input(args, message):
    with pytest.raises(DataError, match=message):
        score(*args)
