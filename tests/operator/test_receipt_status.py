"""What a Receipt's status says about its window's audits, judged and not."""
from consortium_operator.audits import receipt_status


def audit(position, verdict, reasons=()):
    return {"stage": 1, "position": position, "node": "n2", "epoch": 1, "verifier": "n0", "verdict": verdict,
            "reasons": list(reasons), "figures": {"relL2": 0.01, "ok": True}}


def unjudged(position, reason):
    return {"stage": 1, "position": position, "node": "n2", "reason": reason}


def test_nothing_selected_is_pending():
    st = receipt_status([])
    assert st["verdict"] == "Pending" and "no unit" in st["message"]


def test_selected_but_unjudged_units_are_named_with_their_reasons():
    st = receipt_status([], [unjudged(3, "queued when the coordinator stopped; gone"), unjudged(5, "no node left")])
    assert st["verdict"] == "Pending"
    assert st["message"] == ("2 selected unit(s) not judged: no node left; "
                             "queued when the coordinator stopped; gone")


def test_the_worst_verdict_wins_and_unjudged_units_are_still_said():
    st = receipt_status([audit(4, "Passed"), audit(2, "Mismatch", ["relL2 0.4 beyond 0.05"])],
                        [unjudged(7, "no node left")])
    assert st["verdict"] == "Mismatch" and st["verifier"] == "n0"
    assert [a["position"] for a in st["audits"]] == [2, 4]
    assert st["audits"][0]["figures"] == {"relL2": 0.01}   # numbers only
    assert st["message"] == "2 unit(s) audited; relL2 0.4 beyond 0.05; 1 selected unit(s) not judged: no node left"
