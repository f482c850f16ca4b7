"""The saved session state and report in compact form: read back whole, and small enough that a
session at the API's maxTokens fits the 1.5 MiB etcd keeps per object."""
from __future__ import annotations

import json

import numpy as np

from consortium.driver.session import StepRecord
from consortium.driver.state import (SessionState, audit_records, counters_of_report, record_figures,
                                     report_counters, report_steps, steps_of_report)
from consortium.resources import InferenceSessionSpec
from consortium.verification import verdicts

ETCD_LIMIT = int(1.5 * 1024 * 1024)


def _passed(stage, position, node, verifier, epoch=1):
    return {"stage": stage, "position": position, "node": node, "epoch": epoch, "verifier": verifier,
            "verdict": "Passed", "reasons": ["hashes equal"], "figures": None, "hash_equal": True}


def _state(prompt: int, tokens: int, within: float = 0.1, seed: int = 7) -> SessionState:
    """A session as a driver leaves it: the prompt in one step, then one decode step per token, a
    failover of stage 1 at token 20, and an audit of each selected unit: equal hashes, or within
    tolerance (a share `within` of them), one a second opinion."""
    rng = np.random.default_rng(seed)
    st = SessionState(session="ns/long", prompt_tokens=rng.integers(0, 49152, prompt).tolist(),
                      nodes=["n1", "n0", "n0"], epochs=[1, 2, 1], audit_seed=seed)
    st.tokens = rng.integers(0, 49152, tokens - 1).tolist()
    st.batches = [[0, prompt]] + [[prompt + i, 1] for i in range(tokens - 1)]
    st.done = [prompt + tokens - 1] * 3
    st.failovers = [{"stage": 1, "from": "n2", "to": "n0", "epoch": 2, "at_position": prompt + 19}]
    for p in range(prompt + tokens - 1):
        for s in range(3):
            if not st.selected(s, p):
                continue
            node = st.nodes[s] if s != 1 or p >= prompt + 19 else "n2"
            a = _passed(s, p, node, "n2" if node != "n2" else "n1", epoch=st.epochs[s] if node != "n2" else 1)
            if rng.random() < within:
                fig = verdicts.Figures(relative_l2=rng.random() / 50, frac_gt_1=rng.random() / 100, frac_gt_2=0.0,
                                       frac_gt_4=0.0, max_abs_steps=float(rng.integers(1, 4)),
                                       cosine=1 - rng.random() / 1e4, topk_agreement=0.9375)
                a.update(verdict="PassedWithinTolerance", hash_equal=False, figures=record_figures(fig),
                         reasons=["hashes differ; figures within the honest tolerance"])
            st.audits.append(a)
    st.audits[3] = {**st.audits[3], "first_verifier": "n1"}
    return st


def test_the_saved_state_reads_back_whole():
    st = _state(prompt=9, tokens=300)
    st.batches[40:43] = [[st.batches[40][0], 3]]   # a merged step amid the decode steps
    saved = json.loads(json.dumps(st.to_json()))
    assert SessionState.from_json(saved) == st
    assert audit_records(saved) == st.audits
    # Plain passes are the short form, six values within tolerance; the second opinion is whole.
    kinds = [len(a) if isinstance(a, list) else a["verdict"] for a in saved["audits"]]
    assert kinds.count(5) > 10 and kinds.count(6) > 2 and kinds.count("Passed") == 1, kinds
    assert saved["batches"][:3] == [[0, 9], [9, 1, 39], [48, 3]]
    # A state saved before the compact forms (whole records, one entry per step) still loads.
    old = {**saved, "audits": st.audits, "batches": st.batches}
    assert SessionState.from_json(old) == st


def test_steps_and_counters_read_back_whole():
    steps = [StepRecord(0, 12, [], 81.26, False)] + [StepRecord(12 + i, 1, [], 13.04 + i % 3, i == 7)
                                                       for i in range(30)]
    saved = json.loads(json.dumps(report_steps(steps)))
    assert saved["batches"] == [[0, 12], [12, 1, 30]] and saved["failovers"] == [8]
    assert steps_of_report(saved) == [(x.position, x.rows, round(x.wall_ms, 1), x.failover) for x in steps]
    assert steps_of_report(None) == []
    counters = {"n1": [(0, p, 1, 0) for p in range(40)],
                "n0": [(1, p, 0, 1) for p in range(20)] + [(1, p, 1, 0) for p in range(20, 40)] + [(1, 25, 2, 0)],
                "n2": [(1, p, 1 + (p == 7), 0) for p in range(21)]}
    counters["n0"].remove((1, 25, 1, 0))
    saved = json.loads(json.dumps(report_counters(counters)))
    assert saved["n1"] == [[0, 0, 39, 1, 0]] and len(saved["n2"]) == 3
    assert {n: sorted(r) for n, r in counters_of_report(saved).items()} == {n: sorted(r) for n, r in counters.items()}


def _status(st: SessionState, tokens: int, compact: bool = True) -> int:
    """The bytes of what the operator writes into a session's status at its end (JSON as the API
    server stores it), the report as report_counters and report_steps make it, or as it was before."""
    prompt = len(st.prompt_tokens)
    steps = [StepRecord(0, prompt, [], 120.0, False)] + [StepRecord(prompt + i, 1, [], 13.0 + (i * 7919 % 1000) / 137,
                                                                    False) for i in range(tokens - 1)]
    end = prompt + tokens - 1
    counters = {"n1": [(0, p, 1, 0) for p in range(end)], "n2": [(1, p, 1, 0) for p in range(prompt + 19)],
                "n0": [(1, p, 0, 1) for p in range(prompt + 19)] + [(1, p, 1, 0) for p in range(prompt + 19, end)]
                + [(2, p, 1, 0) for p in range(end)]}
    if compact:
        report = {"driverState": st.to_json(), "counters": report_counters(counters), "steps": report_steps(steps)}
    else:
        report = {"driverState": {**st.to_json(), "audits": st.audits, "batches": st.batches},
                  "counters": {n: [list(x) for x in r] for n, r in counters.items()},
                  "steps": [[x.position, x.rows, round(x.wall_ms, 3), x.failover] for x in steps]}
    status = {"tokens": st.tokens + [0], "text": "word " * tokens, "report": report}   # ~5 bytes of text a token
    return len(json.dumps(status, separators=(",", ":")))


def test_a_session_at_max_tokens_fits_one_api_object():
    """At the most tokens the API accepts, 20% audits passing by equal hashes (same hardware), what
    the operator writes at the end stays well below etcd's limit, leaving room for the spec; the
    whole records it wrote before did not fit. Every audit within tolerance (different hardware:
    six figures each) fits at half as many tokens."""
    most = InferenceSessionSpec.model_fields["max_tokens"].metadata[-1].le
    same = _state(prompt=64, tokens=most, within=0.0)
    assert _status(same, most) < 1.2 * 1024 * 1024 < ETCD_LIMIT < _status(same, most, compact=False)
    mixed = _state(prompt=64, tokens=most // 2, within=1.0)
    assert _status(mixed, most // 2) < 1.2 * 1024 * 1024
