"""A resumed session's last token: saved as the final stage answered it, it is checked against the
logit row that node committed before generation goes on (operator.sessions.last_token_unchecked).
Real agents in this process; no cluster needed."""
import base64
import hashlib

from consortium import generation
from consortium.driver.policy import LocalPolicy
from consortium.driver.session import SessionDriver
from consortium.driver.state import SessionState
from consortium.layers import LayerRange
from consortium.models import resolve_model
from consortium.sampling import SamplingParams
from consortium_operator.receipts import signed_by_position
from consortium_operator.sessions import last_token_unchecked
from node_agent import server
from node_agent.identity import NodeIdentity

PROMPT = [1, 504, 3458, 314, 253, 1345, 30, 2]
SAMPLING = SamplingParams(temperature=0.7, top_p=0.9, seed=5)


def test_the_last_token_must_be_what_the_final_stage_committed_row_samples(tmp_path):
    model = str(resolve_model(None))
    servers, endpoints = [], {}
    for n in ("A", "B", "C"):
        srv, _, port = server.serve(NodeIdentity.load_or_create(tmp_path / f"{n}.pem", n), "127.0.0.1:0",
                                    server.AgentConfig(node_id=n, threads=1, n_ctx=128))
        servers.append(srv)
        endpoints[n] = f"127.0.0.1:{port}"
    state = SessionState(session="resume-last", prompt_tokens=PROMPT, nodes=["A", "B", "C"], epochs=[1, 1, 1],
                         audit_probability=0.0)
    driver = SessionDriver(session=state.session, model_path=model, n_layers=30, endpoints=endpoints, state=state,
                           split=[LayerRange(0, 9), LayerRange(10, 19), LayerRange(20, 29)],
                           policy=LocalPolicy(["A", "B", "C"]), receipt_window=4, warm_backups=False)
    try:
        driver.start()
        tokens = generation.generate(driver, PROMPT, 5, sampling=SAMPLING).tokens
        # The Receipts as the operator's ReceiptWriter indexes them.
        written = {str(i): {"stage": e["stage"], "node": e["node"], "epoch": e["epoch"], "start": e["start"],
                            "commitments": [base64.b64decode(c).hex() for c in e["receipt"]["commitments"]]}
                   for i, e in enumerate(driver.receipts)}
        row_at = state.done[2] - 1
        assert any(w["stage"] == 2 and w["start"] <= row_at < w["start"] + len(w["commitments"])
                   for w in written.values())
        assert last_token_unchecked(driver, tokens, written, SAMPLING) is None
        other = tokens[:-1] + [(tokens[-1] + 1) % 49152]
        assert "not what the final stage's row samples" in last_token_unchecked(driver, other, written, SAMPLING)
        forged = {k: dict(w, commitments=[hashlib.sha256(b"forged").hexdigest()] * len(w["commitments"]))
                  if w["stage"] == 2 else w for k, w in written.items()}
        assert "not the one it signed" in last_token_unchecked(driver, tokens, forged, SAMPLING)
        # A rollback has rows signed again: only the latest version of a row counts, not any ever signed.
        replaced = [hashlib.sha256(b"replaced").hexdigest()]
        newer = dict(written, newer={"stage": 2, "node": "C", "epoch": 1, "start": row_at, "commitments": replaced,
                                     "rollbacks": 1})
        assert "not the one it signed" in last_token_unchecked(driver, tokens, newer, SAMPLING)
        stale = {k: dict(w, rollbacks=1) for k, w in written.items()}
        stale["stale"] = {"stage": 2, "node": "C", "epoch": 1, "start": row_at, "commitments": replaced, "rollbacks": 0}
        assert last_token_unchecked(driver, tokens, stale, SAMPLING) is None
    finally:
        driver.close()
        for srv in servers:
            srv.stop(None)


def test_signed_by_position_keeps_the_latest_version_of_each_row():
    """Windows 16..31 signed, a rollback to 28, 28..31 signed again: 16..27 keep the first version,
    28..31 only the second; other nodes' and epochs' windows do not count."""
    first = [bytes([1, p]) for p in range(16, 32)]
    again = [bytes([2, p]) for p in range(28, 32)]
    windows = [(1, "B", 1, 16, first, 0), (1, "B", 1, 28, again, 1),
               (1, "B", 2, 16, [b"x"] * 16, 2), (1, "A", 1, 16, [b"y"] * 16, 3), (0, "B", 1, 16, [b"z"] * 16, 4)]
    signed = signed_by_position(windows, 1, "B", 1)
    assert sorted(signed) == list(range(16, 32))
    assert all(signed[p] == {bytes([1, p])} for p in range(16, 28))
    assert all(signed[p] == {bytes([2, p])} for p in range(28, 32))
