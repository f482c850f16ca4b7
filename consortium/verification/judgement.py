"""Node-level judgement: is a node's Mismatch count consistent with honest hardware?

Honest hardware produces Mismatch verdicts at a calibrated rate p (seed 003 sets the threshold so
that p is about 2%). Under that null hypothesis a node's Mismatch count k over n audits is
Binomial(n, p); the node is quarantined when the one-sided p-value P[X >= k] falls below alpha, or
on any single Fraud. alpha defaults to 0.001 because quarantining an honest node is the error we
must not make; a cheater still fails quickly, since its Mismatch rate is far above p.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable

from .verdicts import Verdict

__all__ = ["binomial_tail", "NodeRecord", "NodeJudgement", "judge_node", "false_fraud", "DEFAULT_ALPHA"]

DEFAULT_ALPHA = 0.001


def binomial_tail(k: int, n: int, p: float) -> float:
    """P[X >= k] for X ~ Binomial(n, p), summed exactly term by term in log space."""
    if not 0 <= p <= 1 or n < 0:
        raise ValueError("need 0 <= p <= 1 and n >= 0")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    logs = [math.log(math.comb(n, i)) + i * lp + (n - i) * lq for i in range(k, n + 1)]
    m = max(logs)
    return min(1.0, math.exp(m) * math.fsum(math.exp(x - m) for x in logs))


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    audits: int = 0
    passed: int = 0
    within_tolerance: int = 0
    mismatches: int = 0
    frauds: int = 0

    def add(self, verdict: Verdict | str) -> "NodeRecord":
        v = Verdict(verdict)
        field = {Verdict.PASSED: "passed", Verdict.PASSED_WITHIN_TOLERANCE: "within_tolerance",
                 Verdict.MISMATCH: "mismatches", Verdict.FRAUD: "frauds"}[v]
        return replace(self, audits=self.audits + 1, **{field: getattr(self, field) + 1})


@dataclass(frozen=True)
class NodeJudgement:
    quarantine: bool
    p_value: float
    reason: str


def judge_node(record: NodeRecord, honest_rate: float, alpha: float = DEFAULT_ALPHA) -> NodeJudgement:
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    # Frauds are decisive on their own and don't enter the test; the rest are the binomial trials.
    n = record.audits - record.frauds
    pv = binomial_tail(record.mismatches, n, honest_rate)
    if record.frauds:
        return NodeJudgement(True, pv, f"{record.frauds} Fraud verdict(s)")
    if pv < alpha:
        return NodeJudgement(True, pv, f"{record.mismatches} Mismatch in {n} audits: P[X >= k | honest rate "
                                       f"{honest_rate:g}] = {pv:.3g} < alpha {alpha:g}")
    return NodeJudgement(False, pv, f"{record.mismatches} Mismatch in {n} audits: p = {pv:.3g} >= alpha {alpha:g}")


def false_fraud(records: Iterable[NodeRecord], honest: Iterable[str], honest_rate: float,
                alpha: float = DEFAULT_ALPHA, quarantined: Iterable[str] = ()) -> int:
    """Honest nodes (by ground truth) that got a Fraud verdict or would be quarantined on their
    record as workers, or were quarantined for any other reason (`quarantined`: as a verifier
    overruled too often, say). Must be 0."""
    honest = set(honest)
    bad = {r.node_id for r in records
           if r.node_id in honest and (r.frauds > 0 or judge_node(r, honest_rate, alpha).quarantine)}
    return len(bad | (set(quarantined) & honest))
