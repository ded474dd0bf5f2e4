"""Benchmark metrics against brute-force and hand-computed references."""
import itertools
import math
from fractions import Fraction

import pytest

from phi_reason.eval.metrics import ks_for, majority_correct, pass_at_k, summarize


def brute_force_pass_at_k(n, c, k):
    """Enumerate every k-subset of n samples (the first c correct): fraction with a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(i < c for i in s) for s in subsets)
    return Fraction(hits, len(subsets))


@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)),
                                                       abs=1e-12), (n, c, k)


def test_pass_at_k_closed_forms_and_errors():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(100, 1, 10) == pytest.approx(0.1)       # 1 - C(99,10)/C(100,10) = 10/100
    assert pass_at_k(64, 0, 64) == 0.0 and pass_at_k(64, 64, 1) == 1.0
    big = 1 - math.comb(200 - 7, 50) / math.comb(200, 50)
    assert pass_at_k(200, 7, 50) == pytest.approx(big, rel=1e-12)
    for bad in [(5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_ks_for():
    assert ks_for(1) == [1]
    assert ks_for(8) == [1, 2, 4, 8]
    assert ks_for(10) == [1, 2, 4, 8, 10]


def S(extracted, correct):
    return {"extracted": extracted, "correct": correct}


def test_majority_vote():
    # correct answers written differently are one class (3 votes) vs "7" x2
    assert majority_correct([S("0.5", True), S("\\frac12", True), S("7", False), S("1/2", True),
                             S("7", False)])
    # wrong answers equal in value but written differently pool their votes: 2/4 = 0.5 twice
    assert not majority_correct([S("2/4", False), S("0.5", False), S("3", True), S(None, False)])
    # unanswered samples do not vote
    assert majority_correct([S(None, False), S(None, False), S("3", True)])
    assert not majority_correct([S(None, False)])
    # a tie goes to the answer seen first
    assert majority_correct([S("3", True), S("4", False)])
    assert not majority_correct([S("4", False), S("3", True)])


def rec(pid, correct, tokens, reason="stop", extracted="x", status="ok"):
    return {"problem_id": pid, "correct": correct, "num_tokens": tokens, "finish_reason": reason,
            "extracted": extracted if not correct else "gold", "status": status}


def test_summarize_by_hand():
    problems = [
        {"id": "a", "subject": "Algebra", "level": 1},
        {"id": "b", "subject": "Algebra", "level": 5},
        {"id": "c", "subject": "Geometry", "level": 5},
    ]
    records = [
        rec("a", True, 10), rec("a", True, 20), rec("a", False, 30, extracted="9"),
        rec("a", True, 40),
        rec("b", False, 100, "length", extracted=None, status="no_answer"),
        rec("b", False, 50, extracted="1"), rec("b", True, 60), rec("b", False, 70, extracted="1"),
        rec("c", False, 5, extracted="2"), rec("c", False, 5, extracted="3"),
        rec("c", False, 5, extracted="4"), rec("c", False, 5, "length", extracted="5"),
    ]
    s = summarize(problems, records)
    assert s["samples_per_problem"] == 4 and s["problems"] == 3 and s["generations"] == 12
    assert s["pass@1"] == pytest.approx((3 / 4 + 1 / 4 + 0) / 3)
    assert s["maj@4"] == pytest.approx(1 / 3)                     # only "a" has a correct majority
    expected_p2 = (pass_at_k(4, 3, 2) + pass_at_k(4, 1, 2) + 0) / 3   # = (1 + 0.5 + 0) / 3
    assert s["pass@k"][2] == pytest.approx(expected_p2) == pytest.approx(0.5)
    assert s["pass@k"][4] == pytest.approx(2 / 3)
    assert s["by_subject"]["Algebra"]["pass@1"] == pytest.approx(0.5)
    assert s["by_subject"]["Geometry"]["pass@1"] == 0.0
    assert s["by_level"]["5"]["problems"] == 2
    assert s["mean_tokens_correct"] == pytest.approx((10 + 20 + 40 + 60) / 4)
    assert s["mean_tokens_incorrect"] == pytest.approx((30 + 100 + 50 + 70 + 20) / 8)
    assert s["truncation_rate"] == pytest.approx(2 / 12)
    assert s["status_counts"] == {"ok": 11, "no_answer": 1}


def test_summarize_rejects_ragged_or_missing():
    problems = [{"id": "a"}, {"id": "b"}]
    with pytest.raises(ValueError, match="no generations"):
        summarize(problems, [rec("a", True, 1)])
    with pytest.raises(ValueError, match="different sample counts"):
        summarize(problems, [rec("a", True, 1), rec("b", True, 1), rec("b", True, 1)])
