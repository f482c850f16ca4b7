"""`consortium verify-receipts`'s check, on Receipt objects made by the operator's own code from
windows signed with real keys: what verifies, and each way one does not."""
from __future__ import annotations

import copy
import hashlib

import pytest

from consortium import receipt_check
from consortium import resources as r
from consortium.sampling import SamplingParams
from consortium.verification import receipts, signing
from consortium_operator.receipts import receipt_body

UID = "0a1b2c3d-0000-4000-8000-000000000000"
PROMPT, TOKENS, WINDOW = 5, 4, 4   # positions fed: 0..7 (the last token is never fed back)
SAMPLING = SamplingParams(temperature=0.7, top_p=0.9, seed=5)   # the final stage (1) signs its tokens


def session(phase="Completed", prompt=PROMPT, tokens=TOKENS):
    return {"metadata": {"name": "sky", "namespace": "ns", "uid": UID},
            "status": {"phase": phase, "tokens": [100 + prompt - 1 + i for i in range(tokens)],
                       "report": {"driverState": {"prompt_tokens": list(range(prompt)), "nodes": ["a", "b"]}}}}


def node(name, key):
    return {"metadata": {"name": name}, "spec": {"publicKey": signing.public_key_text(key)}}


def windows(key, node_id, stage, positions, version=0, session_id=r.session_id("ns", "sky", UID)):
    """The receipts a node signs for `positions` of a stage, window by window (rows computed again
    after a rollback are another version); on the final stage (1) with the tokens it sampled."""
    signer = receipts.WindowSigner(key, session=session_id, stage=stage, node_id=node_id, epoch=1, window=WINDOW)
    out = []
    for p in positions:
        signer.add(p, hashlib.sha256(b"in%d" % p).digest(),
                   hashlib.sha256(b"out%d.%d.%d" % (stage, p, version)).digest(),
                   (SAMPLING, 100 + p) if stage == 1 else None)   # token i is 100 + its row's position
        if (p + 1) % WINDOW == 0 or p == positions[-1]:
            out.append(signer.receipt())
    return out


def objects(key, name, node_id, stage, positions, rollbacks=0, **signed):
    pub = signing.public_key_text(key)
    return [receipt_body(session(), {"stage": stage, "node": name, "epoch": 1, "receipt": w.to_json(),
                                     "rollbacks": rollbacks}, pub)
            for w in windows(key, node_id, stage, positions, rollbacks, **signed)]


@pytest.fixture
def run():
    ka, kb = signing.generate_private_key(), signing.generate_private_key()
    # Node a signs with its ComputeNode name, node b with the id derived from its key (the chart's way).
    items = objects(ka, "a", "a", 0, list(range(8))) + objects(kb, "b", signing.node_id_for(kb), 1, list(range(4, 8)))
    return items, [node("a", ka), node("b", kb)], (ka, kb)


def test_a_complete_session_verifies(run):
    items, nodes, _ = run
    res = receipt_check.check(session(), items, nodes)
    assert res["ok"] and res["complete"] and res["verified"] == res["receipts"] == 3, res
    assert [p["positions"] for p in res["per_stage"]] == ["0-7", "4-7"]
    text = "\n".join(receipt_check.lines(res))
    assert text.splitlines()[-1].startswith("OK: all 3 receipts verify")


def test_a_receipt_written_before_it_named_its_signing_id_still_verifies(run):
    items, nodes, _ = run
    for it in items:
        it["spec"].pop("nodeId")
    assert receipt_check.check(session(), items, nodes)["ok"]


def test_a_receipt_signed_for_a_namesake_does_not_verify():
    """Signed for the session of that name deleted before (another uid): not this session's work.
    Signed with namespace/name alone (sessions saved before ids carried the uid): still verifies."""
    ka = signing.generate_private_key()
    for signed_as, ok in ((r.session_id("ns", "sky", "another-uid"), False), (r.session_id("ns", "sky"), True)):
        items = objects(ka, "a", "a", 0, list(range(8)), session_id=signed_as)
        res = receipt_check.check(session(), items, [node("a", ka)])
        assert res["verified"] == (2 if ok else 0), (signed_as, res)
        if not ok:
            assert "signature does not verify" in res["failed"][0]["reasons"][0], res


def test_each_tampering_is_named(run):
    items, nodes, (ka, _) = run
    cases = {
        "do not hash to the signed Merkle root": lambda it: it["spec"]["commitments"].__setitem__(0, "00" * 32),
        "signature does not verify": lambda it: it["spec"].update(epoch=2),
        "names session": lambda it: it["spec"].update(session="other"),
    }
    for reason, tamper in cases.items():
        bad = copy.deepcopy(items)
        tamper(bad[1])
        res = receipt_check.check(session(), bad, nodes)
        assert not res["ok"] and len(res["failed"]) == 1 and reason in res["failed"][0]["reasons"][0], (reason, res)
        # The positions only that receipt covered are then uncovered.
        assert res["gaps"] == {0: [4, 5, 6, 7]}
        assert "DOES NOT VERIFY" in "\n".join(receipt_check.lines(res))


def test_the_final_stages_signed_tokens_are_part_of_its_receipt(run):
    items, nodes, _ = run
    final = items[2]["spec"]
    assert final["sampled"]["tokens"] == [{"position": p, "token": 100 + p} for p in range(4, 8)]
    assert final["sampled"]["topP"] == 0.9 and "sampled" not in items[0]["spec"]
    for tamper in (lambda sp: sp["tokens"][1].update(token=7), lambda sp: sp.update(seed=6), lambda sp: sp["tokens"].pop()):
        bad = copy.deepcopy(items)
        tamper(bad[2]["spec"]["sampled"])
        res = receipt_check.check(session(), bad, nodes)
        assert not res["ok"] and "signature does not verify" in res["failed"][0]["reasons"][0], res


def test_the_tokens_shown_are_checked_against_those_the_final_stage_signed(run):
    items, nodes, _ = run
    res = receipt_check.check(session(), items, nodes)
    assert res["tokens_signed"] == TOKENS and res["tokens_unsigned"] == [] and res["tokens_contradicted"] == []
    assert f"signed as sampled from its committed rows: {TOKENS} of {TOKENS}" in "\n".join(receipt_check.lines(res))
    # A session whose status shows another token than the one signed for its row.
    shown = session()
    shown["status"]["tokens"][2] = 7
    res = receipt_check.check(shown, items, nodes)
    assert not res["ok"] and res["tokens_contradicted"] == [{"token": 2, "shown": 7, "signed": [106]}], res
    assert "TOKEN 2: the session shows 7, the final stage signed 106" in "\n".join(receipt_check.lines(res))
    # A row signed without its token (a backup's replay) leaves that token unsigned, not contradicted.
    bare = copy.deepcopy(items)
    bare[2]["spec"]["sampled"]["tokens"].pop(0)
    res = receipt_check.token_signatures(bare, session()["status"]["tokens"], PROMPT, 1, receipt_check.standing(bare))
    assert res == {"signed": TOKENS - 1, "unsigned": [0], "contradicted": []}


def test_a_node_that_publishes_another_key_or_none(run):
    items, nodes, _ = run
    rekeyed = [node("a", signing.generate_private_key()), nodes[1]]
    res = receipt_check.check(session(), items, rekeyed)
    assert not res["ok"] and len(res["failed"]) == 2 and "now publishes" in res["failed"][0]["reasons"][0]
    res = receipt_check.check(session(), items, nodes[1:])
    assert not res["ok"] and "no ComputeNode 'a'" in res["failed"][0]["reasons"][0]


def test_coverage_is_judged_once_the_session_has_ended(run):
    items, nodes, _ = run
    longer = session(tokens=TOKENS + 2)   # positions 8 and 9 fed, in no receipt
    res = receipt_check.check(longer, items, nodes)
    assert not res["ok"] and res["gaps"] == {0: [8, 9], 1: [8, 9]}
    assert "NOT COVERED: stage 0 positions 8, 9" in "\n".join(receipt_check.lines(res))
    running = session(phase="Running", tokens=TOKENS + 2)
    assert receipt_check.check(running, items, nodes)["ok"]
    # A failed session shows only tokens its Receipts back (the operator drops the others).
    failed = session(phase="Failed", tokens=TOKENS + 2)
    assert not receipt_check.check(failed, items, nodes)["ok"]
    assert receipt_check.check(session(phase="Failed"), items, nodes)["ok"]
    # Failed in its prompt: no token came of the rows it computed.
    stage_1 = [it for it in items if it["spec"]["stage"] == 1]   # stage 0's node died before signing
    assert receipt_check.check(session(phase="Failed", tokens=0), stage_1, nodes)["complete"]


def test_a_namesakes_receipts_are_not_counted(run):
    items, nodes, _ = run
    for it in items:
        it["metadata"]["ownerReferences"][0]["uid"] = "another"
    res = receipt_check.check(session(), items, nodes)
    assert not res["ok"] and res["receipts"] == 0 and res["not_owned"] == 3
    assert receipt_check.lines(res)[-1] == "FAIL: the session owns no receipts"


def test_a_fraud_proof_that_does_not_hold_fails_the_check(run):
    items, nodes, _ = run
    items[0]["status"] = {"fraudProofs": ["{}", "not json"]}
    res = receipt_check.check(session(), items, nodes)
    assert not res["ok"] and res["fraud_proofs"] == 2 and len(res["fraud_proofs_failed"]) == 2
    assert "fraud proofs in the receipts' status: 0 of 2 hold" in "\n".join(receipt_check.lines(res))



def test_after_a_rollback_the_windows_signed_again_stand():
    """Stage 0 signed positions 0-7, the session rolled back to 4, and 4-7 were signed again: the
    first 4-7 window is superseded, and only the new one covers those positions."""
    key = signing.generate_private_key()
    rolled = session()
    rolled["status"]["report"]["driverState"].update(nodes=["a"], rollbacks=[{"to_position": 4}])
    old, new = objects(key, "a", "a", 0, range(8)), objects(key, "a", "a", 0, range(4, 8), rollbacks=1)
    nodes = [node("a", key)]
    res = receipt_check.check(rolled, old + new, nodes)
    assert res["ok"] and res["complete"] and res["per_stage"][0]["superseded"] == 1, res
    assert res["per_stage"][0]["verdicts"] == {"Pending": 2, "Pending (superseded)": 1}
    assert "Pending (superseded) 1" in "\n".join(receipt_check.lines(res))
    # The standing window does not verify: its positions are uncovered, though the old one verifies.
    bad = copy.deepcopy(new)
    bad[0]["spec"]["commitments"][0] = "00" * 32
    res = receipt_check.check(rolled, old + bad, nodes)
    assert not res["ok"] and res["gaps"] == {0: [4, 5, 6, 7]}, res
    # Rows computed again bit for bit are signed in the same window, written once: it stands.
    res = receipt_check.check(rolled, old, nodes)
    assert res["ok"] and res["complete"] and res["per_stage"][0]["superseded"] == 0, res
