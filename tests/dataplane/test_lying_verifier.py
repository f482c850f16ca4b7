"""A verdict that accuses a worker by a distance (Fraud or Mismatch) rests on the verifier's
recomputation: it counts only once a second verifier agrees (consortium.driver.session,
SessionDriver._judge).

Real agents on loopback ports in this process. A lying verifier (its audits answer random or noisy
rows) would otherwise frame every worker it audits; here it is overruled by the second verifier and
caught itself. A cheating worker is still convicted, once the second verifier confirms.
"""
from consortium import generation
from consortium.driver.policy import LocalPolicy
from consortium.driver.session import SessionDriver
from consortium.driver.state import SessionState
from node_agent import server
from node_agent.identity import NodeIdentity

from tests.dataplane.test_failover import KILL_TOKEN, MAX_TOKENS, PROMPT, SPLIT, single_node_tokens


def run_session(tmp_path, model_path, name: str, nodes: list[str], preference: list[str],
                config: dict[str, dict], kill_stage: int | None = None) -> tuple[SessionDriver, list[int]]:
    """Agents named by `config`'s keys (value: AgentConfig fields); a session with every unit audited.
    With kill_stage: that stage's agent stops at token KILL_TOKEN."""
    servers, endpoints = {}, {}
    kill_position = len(PROMPT) + KILL_TOKEN - 1

    def on_stage(s, position):
        if s == kill_stage and position == kill_position and servers.get(nodes[s]) is not None:
            servers.pop(nodes[s]).stop(None)

    try:
        for n, extra in config.items():
            ident = NodeIdentity.load_or_create(tmp_path / f"{n}.pem", n)
            srv, _, port = server.serve(ident, "127.0.0.1:0",
                                        server.AgentConfig(node_id=n, threads=1, n_ctx=256, **extra))
            servers[n], endpoints[n] = srv, f"127.0.0.1:{port}"
        state = SessionState(session=name, prompt_tokens=PROMPT, nodes=nodes, epochs=[1, 1, 1], audit_probability=1.0)
        driver = SessionDriver(session=name, model_path=model_path, split=SPLIT, n_layers=30, endpoints=endpoints,
                               state=state, policy=LocalPolicy(preference), rpc_timeout_s=10.0)
        driver.on_stage = on_stage
        try:
            driver.start()
            got = generation.generate(driver, PROMPT, MAX_TOKENS).tokens
        finally:
            driver.close()
    finally:
        for srv in servers.values():
            srv.stop(None)
    # A restarted operator resumes from the saved state alone: every node's record as a worker and as
    # a verifier comes back as it was, so its judgement goes on where it was.
    resumed = SessionDriver(session=name, model_path=model_path, split=SPLIT, n_layers=30, endpoints=endpoints,
                            state=SessionState.from_json(state.to_json()), policy=LocalPolicy(preference))
    resumed.close()
    assert resumed.records == driver.records and resumed.verifier_records == driver.verifier_records, (
        resumed.records, driver.records, resumed.verifier_records, driver.verifier_records)
    return driver, got


def test_a_lying_verifier_is_overruled_and_caught_instead_of_the_workers_it_accuses(tmp_path, model_path):
    want = single_node_tokens(model_path)
    # L is everyone's first choice of verifier, and serves the last stage itself (honestly).
    driver, got = run_session(tmp_path, model_path, "lying-verifier", ["A", "B", "L"], ["L", "A", "B"],
                              {"A": {}, "B": {}, "L": {"audit_fault": "random"}})
    st = driver.state

    assert got == want
    assert st.quarantined == ["L"], st.quarantined
    over = st.overruled
    assert over and {o["verifier"] for o in over} == {"L"}, over
    assert all(o["node"] in ("A", "B") and o["overruled_by"] in ("A", "B") and o["overruled_by"] != o["node"]
               and o["verdict"] in ("Passed", "PassedWithinTolerance") for o in over), over
    assert driver.second_opinions >= len(over)
    # No honest worker got a Fraud verdict or a record that would quarantine it.
    assert not [a for a in st.audits if a["verdict"] == "Fraud"], st.audits
    assert all(driver.records[n].frauds == 0 for n in ("A", "B") if n in driver.records)
    assert not driver.proofs.report()
    # L's stage moved to an honest node, which rebuilt it; L verified nothing after it was caught.
    assert st.nodes[2] in ("A", "B") and st.epochs[2] == 2
    assert driver.receipts and all(r["verified"] for r in driver.receipts)


def test_a_verifier_whose_lies_are_mere_mismatches_is_overruled_until_its_record_fails(tmp_path, model_path):
    """L's audits add 10% noise: each of its verdicts is a Mismatch, not a Fraud, and enough of them
    quarantine a worker by the binomial test (both honest workers were, before second opinions).
    Each is audited again and overruled by a pass; the overrulings count in L's own record as
    verifier, which fails the same test: L is quarantined, A and B are not."""
    want = single_node_tokens(model_path)
    driver, got = run_session(tmp_path, model_path, "subtle-liar", ["A", "B", "L"], ["L", "A", "B"],
                              {"A": {}, "B": {}, "L": {"audit_fault": "noise-0.1"}})
    st = driver.state

    assert got == want
    assert st.quarantined == ["L"], st.quarantined
    over = [o for o in st.overruled if o["overruled_by"] is not None]
    assert over and {(o["verifier"], o["first_verdict"]) for o in over} == {("L", "Mismatch")}, over
    assert all(o["verdict"] in ("Passed", "PassedWithinTolerance") for o in over)
    assert driver.verifier_records["L"].mismatches == len(over)
    assert not [a for a in st.audits if a["verdict"] in ("Mismatch", "Fraud")], st.audits
    assert all(driver.records[n].mismatches == 0 for n in ("A", "B") if n in driver.records)


def test_with_two_nodes_left_a_lying_verifiers_word_waits_and_falls_when_it_is_caught(tmp_path, model_path):
    """B dies at token 5. L's Fraud verdicts on A's rows after that have no third node to ask: they
    wait for the session's end. L's verdicts on B's rows (B's death does not unsign them) are
    overruled by A, so L is caught, and at the end its waiting verdicts are dropped: A, the one
    honest node left, is never convicted and finishes every stage."""
    want = single_node_tokens(model_path)
    driver, got = run_session(tmp_path, model_path, "liar-two-left", ["A", "B", "L"], ["L", "A", "B"],
                              {"A": {}, "B": {}, "L": {"audit_fault": "random"}}, kill_stage=1)
    st = driver.state

    assert got == want
    assert st.quarantined == ["L"], st.quarantined
    assert st.nodes == ["A", "A", "A"], st.nodes
    assert [o for o in st.overruled if o["overruled_by"] == "A"], st.overruled
    assert {o["verifier"] for o in st.overruled} == {"L"}
    assert not [a for a in st.audits if a["verdict"] == "Fraud"], st.audits
    # Those that waited were dropped, each reported unjudged (how many waited depends on when the
    # audits ran against B's death).
    dropped = [u for u in st.unjudged if "verdict dropped: it was caught" in u["reason"]]
    assert len(dropped) == sum(o["overruled_by"] is None for o in st.overruled)
    assert all(u["node"] == "A" for u in dropped)


def test_a_cheating_worker_is_convicted_once_a_second_verifier_agrees(tmp_path, model_path):
    want = single_node_tokens(model_path)
    driver, got = run_session(tmp_path, model_path, "confirmed-cheater", ["A", "C", "A"], ["V", "W", "A"],
                              {"A": {}, "C": {"fault": "random"}, "V": {}, "W": {}})
    st = driver.state

    assert got == want
    assert st.quarantined == ["C"], st.quarantined
    assert driver.second_opinions >= 1 and not st.overruled
    frauds = [a for a in st.audits if a["verdict"] == "Fraud"]
    assert frauds and {a["node"] for a in frauds} == {"C"}
    # The convicting verdict is the second verifier's: V asked first, W confirmed.
    assert {a["verifier"] for a in frauds} == {"W"}, frauds
    assert st.rollbacks and st.nodes[1] != "C"
