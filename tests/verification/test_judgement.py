"""The binomial test against exact rational arithmetic and hand-computed cases."""
from __future__ import annotations

from fractions import Fraction
from math import factorial

import pytest

from consortium.verification import judgement
from consortium.verification.judgement import NodeRecord
from consortium.verification.verdicts import Verdict


def exact_tail(k: int, n: int, p: Fraction) -> Fraction:
    # Independent: exact rationals, binomial coefficients from factorials.
    return sum((Fraction(factorial(n), factorial(i) * factorial(n - i)) * p**i * (1 - p) ** (n - i)
                for i in range(k, n + 1)), Fraction(0))


@pytest.mark.parametrize("k, n, p, want", [
    (0, 10, 0.02, 1.0),                 # P[X >= 0] = 1
    (1, 1, 0.02, 0.02),                 # one trial
    (3, 4, 0.5, 5 / 16),                # (C(4,3) + C(4,4)) / 16
    (2, 2, 0.1, 0.01),                  # p^2
    (1, 3, 0.5, 7 / 8),                 # 1 - (1/2)^3
    (11, 10, 0.3, 0.0),                 # more mismatches than audits: impossible
])
def test_tail_by_hand(k, n, p, want):
    assert judgement.binomial_tail(k, n, p) == pytest.approx(want, rel=1e-12, abs=1e-300)


def test_tail_n10_k3_p002_by_hand():
    # 1 - P0 - P1 - P2 with P0 = .98^10, P1 = 10 * .02 * .98^9, P2 = 45 * .02^2 * .98^8.
    want = 1 - 0.98**10 - 10 * 0.02 * 0.98**9 - 45 * 0.02**2 * 0.98**8
    assert judgement.binomial_tail(3, 10, 0.02) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("k, n", [(0, 50), (1, 50), (4, 50), (10, 200), (35, 2000), (80, 2000), (200, 2000)])
def test_tail_against_exact_rationals(k, n):
    got = judgement.binomial_tail(k, n, 0.02)
    want = float(exact_tail(k, n, Fraction(2, 100)))
    assert got == pytest.approx(want, rel=1e-9)


def test_seed_003_example():
    # Seed 003 reports 35/2000 at p = 0.02 as consistent with honest (one-sided p = 0.809).
    assert judgement.binomial_tail(35, 2000, 0.02) == pytest.approx(0.809, abs=0.001)


def record(audits: int, mismatches: int, frauds: int = 0) -> NodeRecord:
    r = NodeRecord("n")
    for v in ([Verdict.MISMATCH] * mismatches + [Verdict.FRAUD] * frauds
              + [Verdict.PASSED] * (audits - mismatches - frauds)):
        r = r.add(v)
    return r


def test_one_fraud_quarantines():
    j = judgement.judge_node(record(100, 0, 1), 0.02)
    assert j.quarantine and "Fraud" in j.reason


def test_honest_counts_are_not_quarantined_and_cheaters_are():
    assert not judgement.judge_node(record(20, 1), 0.02).quarantine
    assert not judgement.judge_node(record(200, 9), 0.02).quarantine   # 4.5%: P ~ 0.02, not < 0.001
    assert judgement.judge_node(record(200, 30), 0.02).quarantine
    assert judgement.judge_node(record(5, 3), 0.02).quarantine          # 10 * .02^3 ~ 8e-5


def test_record_counts():
    r = NodeRecord("x").add("Passed").add(Verdict.PASSED_WITHIN_TOLERANCE).add("Mismatch").add("Fraud")
    assert (r.audits, r.passed, r.within_tolerance, r.mismatches, r.frauds) == (4, 1, 1, 1, 1)


def test_false_fraud_counts_only_honest_nodes():
    recs = [NodeRecord("h1").add("Passed"), NodeRecord("h2").add("Fraud"), NodeRecord("c1").add("Fraud"),
            NodeRecord("h3", audits=5, passed=2, mismatches=3)]
    assert judgement.false_fraud(recs, honest={"h1", "h2", "h3"}, honest_rate=0.02) == 2  # h2 and h3
    assert judgement.false_fraud(recs, honest={"h1"}, honest_rate=0.02) == 0
