"""The person-facing outcome of a Test Case v1 report: each of the seed's criteria marked from the
report's own figures, so a wrong token, a failed audit or a restart shows up as FAIL."""
import copy

from consortium import testreport


def passing_report() -> dict:
    units = [{"stage": s, "position": p, "node": n, "verifier": "N0" if n != "N0" else "N2",
              "verdict": "Passed", "hash_equal": True} for s, n in enumerate(("N1", "N2", "N0")) for p in range(3)]
    return {
        "max_tokens": 4, "split": "0-9,10-19,20-29", "prompt_tokens": 5,
        "nodes": {n: {"backend": "cpu", "repack": True} for n in ("N0", "N1", "N2")},
        "baseline": {"tokens": [1, 2, 3, 4], "tokens_per_s": 50.0},
        "distributed": {"tokens": [1, 2, 3, 4], "tokens_per_s": 12.0, "per_stage_ms": [5.0, 6.0, 7.0]},
        "exact_match": True, "first_divergence": None,
        "audits": {"total": 9, "passed": 9, "passed_within_tolerance": 0, "mismatch": 0, "fraud": 0,
                   "probability": 0.2, "units": units},
        "failover": {"injected": True, "completed": True, "killed_node": "N2", "how": "SIGKILL", "at_token": 2,
                     "backup_node": "N0", "spike_ms": 400.0, "events": []},
        "session_restarts": 0, "false_fraud": 0, "success": True,
        "receipts_check": {"ok": True, "receipts": 6, "verified": 6, "failed": [], "complete": True, "gaps": {},
                           "fraud_proofs": 0, "fraud_proofs_failed": []},
    }


def marks(r):
    return {c: ok for c, ok, _ in testreport.criteria(r)}


def test_a_passing_run_is_all_pass():
    r = passing_report()
    assert set(marks(r).values()) == {True}
    md = "\n".join(testreport.markdown(r))
    assert md.startswith("**PASS") and "| FAIL |" not in md
    assert "cpu / cpu: 9 of 9 equal" in md and "CUDA and Metal not measured yet" in md


def test_each_failure_is_marked_on_its_own_criterion():
    cases = {
        "2. output correct": lambda r: r.update(exact_match=False, first_divergence=3,
                                                distributed={**r["distributed"], "tokens": [1, 2, 3, 9]}),
        "3. all audits": lambda r: r["audits"]["units"][4].update(verdict="Mismatch"),
        "4. failover": lambda r: r["failover"].update(completed=False),
        # A restart is also a failover that did not go on without one.
        "4. failover|no session restart": lambda r: r.update(session_restarts=1),
        "no false fraud": lambda r: r.update(false_fraud=1),
        "signed receipts": lambda r: r["receipts_check"].update(ok=False, complete=False, gaps={1: [7]}),
    }
    for prefixes, breaks in cases.items():
        r = copy.deepcopy(passing_report())
        breaks(r)
        r["success"] = False
        failed = [c for c, ok in marks(r).items() if ok is False]
        want = prefixes.split("|")
        assert len(failed) == len(want) and all(c.startswith(p) for c, p in zip(failed, want)), (want, failed)
        assert testreport.outcome(r).startswith("FAIL")


def test_no_failure_injected_is_not_exercised_and_a_caught_cheater_is_not_an_honest_failure():
    r = passing_report()
    r["failover"] = {"injected": False, "completed": False, "events": []}
    assert marks(r)["4. failover completes without a session abort"] is None
    r["audits"]["units"][4].update(verdict="Fraud", hash_equal=False)   # N2's unit
    r["fault"] = {"node": "N2", "kind": "replay", "caught": True, "rollbacks": [{}]}
    m = marks(r)
    assert m["3. all audits of honest nodes pass"] and m["the faulty worker is caught and quarantined"]


def test_a_lying_verifier_is_judged_by_what_it_accused():
    from consortium.standalone import liar_figures

    crit = "the lying verifier is caught, not the workers it accused"
    state = {"quarantined": ["N0"], "audits": [],
             "overruled": [{"verifier": "N0", "overruled_by": "N1"}, {"verifier": "N0", "overruled_by": None},
                           {"verifier": "N2", "overruled_by": "N1"}]}
    caught = liar_figures("N0", "random", state)
    assert (caught["accusations"], caught["overruled_verdicts"], caught["dropped_verdicts"]) == (2, 1, 1)
    assert marks({**passing_report(), "lying_verifier": caught})[crit] is True
    # Killed before it accused anyone: nothing to catch, not a failure.
    silent = liar_figures("N0", "random", {"quarantined": [], "audits": [], "overruled": []})
    assert silent["accusations"] == 0 and marks({**passing_report(), "lying_verifier": silent})[crit] is None
    # Its word taken where no third node was left: an accusation that stood, and it was not caught.
    stood = liar_figures("N0", "random", {"quarantined": ["N1"], "overruled": [],
                                          "audits": [{"verifier": "N0", "verdict": "Fraud"},
                                                     {"verifier": "N0", "verdict": "Passed"}]})
    assert stood["standing_accusations"] == 1 and marks({**passing_report(), "lying_verifier": stood})[crit] is False


def test_the_standalone_receipts_row_is_the_drivers_check():
    r = {k: v for k, v in passing_report().items() if k != "receipts_check"}
    crit = "signed receipts: each verifies under its node's key"
    assert marks({**r, "receipts": {"count": 6, "verified": 6}})[crit] is True
    assert marks({**r, "receipts": {"count": 6, "verified": 5}})[crit] is False
