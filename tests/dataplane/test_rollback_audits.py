"""A rollback drops only the audit units whose positions it cuts.

Three real agents on loopback ports in this process, every unit selected. The driver's audit loop is
held back (its audit lock taken) while the session runs, so that every unit selected so far is
waiting when a rewind cuts the session back to a position after the prompt: still queued, or (the
loop let go for one audit, held as its answer comes back) in flight with rows replayed from the
inputs the rewind replaces. Units before that position were computed once and stand: each must still
be judged. Units from it on were computed again and selected anew: the old ones are counted
superseded, and every selected unit is accounted for.
"""
import threading

import pytest

from consortium import generation
from consortium.driver.policy import LocalPolicy
from consortium.driver.session import SessionDriver
from consortium.driver.state import SessionState
from consortium.layers import LayerRange
from node_agent import server
from node_agent.engine.pipeline import LocalPipeline
from node_agent.engine.stage import StageConfig
from node_agent.identity import NodeIdentity

SPLIT = [LayerRange(0, 9), LayerRange(10, 19), LayerRange(20, 29)]
PROMPT = [1, 504, 3458, 314, 253, 1345, 30, 2]
MAX_TOKENS = 8
REWIND_TO = len(PROMPT) + 3


@pytest.mark.parametrize("in_flight", [False, True], ids=["queued", "in-flight"])
def test_a_rollback_keeps_the_units_before_its_cut(tmp_path, model_path, in_flight):
    with LocalPipeline(model_path, None, StageConfig(threads=1)) as pipe:
        want = generation.generate(pipe, PROMPT, MAX_TOKENS).tokens
    servers, endpoints = {}, {}
    for n in ("A", "B", "C"):
        ident = NodeIdentity.load_or_create(tmp_path / f"{n}.pem", n)
        servers[n], _, port = server.serve(ident, "127.0.0.1:0", server.AgentConfig(node_id=n, threads=1, n_ctx=256))
        endpoints[n] = f"127.0.0.1:{port}"
    state = SessionState(session="cut", prompt_tokens=PROMPT, nodes=["A", "B", "C"], epochs=[1, 1, 1],
                         audit_probability=1.0)
    driver = SessionDriver(session=state.session, model_path=model_path, split=SPLIT, n_layers=30,
                           endpoints=endpoints, state=state, policy=LocalPolicy(["A", "B", "C"]),
                           rpc_timeout_s=30.0)
    rewind_position = driver.rewind_position
    before = {}
    answered, rolled_back = threading.Event(), threading.Event()
    for client in driver.clients.values():
        def call_while(method, *args, real=client.call_while, **kw):
            got = real(method, *args, **kw)
            if method == "Audit" and not rolled_back.is_set():
                answered.set()
                rolled_back.wait(30)
            return got
        client.call_while = call_while

    def rewind_once(wait=False):
        # Once positions up to the cut plus one are computed: a rewind without accusation (as after
        # commitments lost on the way).
        if not before and len(state.tokens) == REWIND_TO - len(PROMPT) + 3:
            with driver._lock:
                before["selected"] = driver.audits_selected
                before["judged"] = len(state.audits)
                driver._pending_rewind.append((REWIND_TO, "the test's rewind"))
            if in_flight:
                driver._audit_serial.release()
                assert answered.wait(30)
            at = rewind_position(wait)
            rolled_back.set()
            if not in_flight:
                driver._audit_serial.release()
            return at
        return rewind_position(wait)

    driver.rewind_position = rewind_once
    driver._audit_serial.acquire()
    try:
        driver.start()
        got = generation.generate(driver, PROMPT, MAX_TOKENS).tokens
    finally:
        if not before:
            driver._audit_serial.release()
        rolled_back.set()
        driver.close()
        for srv in servers.values():
            srv.stop(None)

    assert got == want
    assert before and before["judged"] == 0 and state.rollbacks[0]["to_position"] == REWIND_TO
    # Every position before the cut (on the final stage: from the prompt's last row, the first with
    # logits) was selected before the rollback and computed only once: each is judged.
    judged = {(a["stage"], a["position"]) for a in state.audits}
    kept = {(s, p) for s in range(3) for p in range(len(PROMPT) - 1 if s == 2 else 0, REWIND_TO)}
    assert before["selected"] >= len(kept)
    assert kept <= judged, sorted(kept - judged)
    assert driver.audits_superseded > 0   # units at the cut positions, selected again from their new rows
    assert driver.unjudged == []
    assert driver.audits_selected == len(state.audits) + driver.audits_superseded
    assert all(a["verdict"] == "Passed" for a in state.audits)
