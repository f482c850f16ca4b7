"""Failover when the agent that should resend a stage's inputs is dead too (DESIGN.md §6).

Four real agents on loopback ports in this process. Stage 1's agent and stage 0's agent (its
upstream, which would resend stage 1's inputs) are stopped together mid-generation: the failover of
stage 1 finds no one to resend, fails stage 0 over as well (rebuilt from the token ids), takes stage
1's inputs from stage 0's replacement, and the session ends with the single-node tokens.
"""
import pytest

from consortium import generation
from consortium.driver.policy import LocalPolicy, NoCandidate
from consortium.driver.session import SessionDriver
from consortium.driver.state import SessionState
from consortium.layers import LayerRange
from consortium.verification import receipts, signing
from node_agent import server
from node_agent.engine.pipeline import LocalPipeline
from node_agent.engine.stage import StageConfig
from node_agent.identity import NodeIdentity

SPLIT = [LayerRange(0, 9), LayerRange(10, 19), LayerRange(20, 29)]
PROMPT = [1, 504, 3458, 314, 253, 1345, 30, 2]
MAX_TOKENS = 10
KILL_TOKEN = 5


def single_node_tokens(model_path) -> list[int]:
    with LocalPipeline(model_path, None, StageConfig(threads=1)) as pipe:
        return generation.generate(pipe, PROMPT, MAX_TOKENS).tokens


def start_agents(tmp_path, faults: dict[str, str | None]) -> tuple[dict, dict]:
    """Agents in this process, named by `faults`' keys (value: the fault it serves, or None)."""
    servers, endpoints = {}, {}
    for n, fault in faults.items():
        ident = NodeIdentity.load_or_create(tmp_path / f"{n}.pem", n)
        srv, _, port = server.serve(ident, "127.0.0.1:0", server.AgentConfig(node_id=n, threads=1, n_ctx=256,
                                                                            fault=fault))
        servers[n], endpoints[n] = srv, f"127.0.0.1:{port}"
    return servers, endpoints


def generate_then_stop(driver, servers: dict, prompt: list[int] = PROMPT, max_tokens: int = MAX_TOKENS) -> list[int]:
    """The session's tokens; then the driver and every agent still there stop."""
    try:
        driver.start()
        return generation.generate(driver, prompt, max_tokens).tokens
    finally:
        driver.close()
        for srv in servers.values():
            if srv is not None:
                srv.stop(None)


def test_stage_failover_recomputes_upstream_when_its_agent_is_dead_too(tmp_path, model_path):
    want = single_node_tokens(model_path)
    servers, endpoints = start_agents(tmp_path, dict.fromkeys(("A", "B", "C", "D")))
    state = SessionState(session="upstream-dead", prompt_tokens=PROMPT, nodes=["A", "B", "C"], epochs=[1, 1, 1],
                         audit_probability=0.0)
    driver = SessionDriver(session=state.session, model_path=model_path, split=SPLIT, n_layers=30,
                           endpoints=endpoints, state=state, policy=LocalPolicy(["D", "C", "B", "A"]),
                           rpc_timeout_s=10.0)
    kill_position = len(PROMPT) + KILL_TOKEN - 1

    def on_stage(s, position):   # just before stage 1's hop: its agent and the upstream one die
        if s == 1 and position == kill_position and not stopped:
            for n in ("A", "B"):
                servers[n].stop(None)
                stopped.append(n)

    stopped: list[str] = []
    driver.on_stage = on_stage
    got = generate_then_stop(driver, servers)

    assert stopped == ["A", "B"]
    assert got == want
    fo = state.failovers
    # Stage 1 failed over to D; rebuilding it needed stage 0's outputs, whose agent was gone: stage 0
    # failed over (to D as well, the only node left besides C) and was rebuilt from the token ids.
    assert [(f["stage"], f["from"]) for f in fo] == [(0, "A"), (1, "B")], fo
    assert "could not resend" in fo[0]["reason"]
    assert fo[0]["replayed_rows"] == kill_position + 1 and fo[1]["replayed_rows"] == kill_position
    assert state.nodes[:2] == ["D", "D"] and state.epochs[:2] == [2, 2]
    # Every receipt verifies, and positions before and after the failover are signed by each stage.
    assert driver.receipts and all(r["verified"] for r in driver.receipts)
    for s in range(3):
        covered = set()
        for r in driver.receipts:
            if r["stage"] == s:
                covered.update(range(r["start"], r["start"] + r["count"]))
        assert covered, s
    # The replayed rows of stage 0 are the rows A sent: their commitments agree position by position.
    key = {n: NodeIdentity.load_or_create(tmp_path / f"{n}.pem", n).public_key_text for n in ("A", "D")}
    by_node = {}
    for r in driver.receipts:
        if r["stage"] == 0:
            rc = receipts.Receipt.from_json(r["receipt"])
            assert signing.verify_signature(key[r["node"]], rc.statement.encode(), rc.signature)
            for p, c in zip(rc.statement.positions, rc.commitments):
                by_node.setdefault(r["node"], {})[p] = c
    common = set(by_node["A"]) & set(by_node["D"])
    assert common and all(by_node["A"][p] == by_node["D"][p] for p in common)


def test_rows_a_dying_cheater_never_committed_are_judged_and_rolled_back(tmp_path, model_path):
    """Stage 1's agent sends random rows and dies before it commits any (it signs once per window,
    and no window is complete yet); nothing audits it. The failover judges those rows against the
    backup's replay, finds them beyond tolerance, and rewinds to the prompt: the session still ends
    with the single-node tokens. Nobody is accused: the node signed none of those rows, and the
    backup's word alone convicts no one (a cheating backup would frame honest nodes with it)."""
    want = single_node_tokens(model_path)
    servers, endpoints = start_agents(tmp_path, {"H": None, "C": "random"})
    state = SessionState(session="dying-cheater", prompt_tokens=PROMPT, nodes=["H", "C", "H"], epochs=[1, 1, 1],
                         audit_probability=0.0)
    driver = SessionDriver(session=state.session, model_path=model_path, split=SPLIT, n_layers=30,
                           endpoints=endpoints, state=state, policy=LocalPolicy(["H", "C"]), rpc_timeout_s=10.0,
                           sign_per_window=True)
    kill_position = len(PROMPT) + KILL_TOKEN - 1   # before position 15: no window of 16 is complete

    def on_stage(s, position):
        if s == 1 and position == kill_position and servers["C"] is not None:
            servers["C"].stop(None)
            servers["C"] = None

    driver.on_stage = on_stage
    got = generate_then_stop(driver, servers)

    assert servers["C"] is None and not [r for r in driver.receipts if r["node"] == "C"]
    fo = state.failovers[0]
    assert (fo["stage"], fo["from"], fo["to"]) == (1, "C", "H")
    judged = fo["unsigned_rows"]
    assert judged["rows"] == kill_position and judged["rewind_from"] == 0, judged
    assert "Passed" not in judged["verdicts"], judged
    assert judged["verdicts"].get("Fraud"), judged   # random rows are decisive: Fraud, not only Mismatch
    assert state.rollbacks and state.rollbacks[0]["to_position"] == 0
    assert state.quarantined == []
    assert got == want


def test_rows_resent_after_a_restart_must_be_what_their_node_signed():
    """A resumed driver takes its audit material from rows the upstream node resends. A row that
    hashes to none of the commitments that node signed for its position is Fraud: replayed in the
    next stage's audits, it would frame that stage."""
    state = SessionState(session="resumed", prompt_tokens=[1, 2], nodes=["a", "b", "c"], epochs=[1, 2, 1],
                         audit_probability=0.0)
    d = SessionDriver(session="resumed", model_path="unused.gguf", split=[LayerRange(0, 9), LayerRange(10, 19),
                                                                          LayerRange(20, 29)],
                      n_layers=30, endpoints={}, state=state, policy=LocalPolicy(["a", "b", "c"]))
    c = [bytes([i]) * 32 for i in range(4)]
    # Any signed version counts (a rollback signs a window again); an unsigned position is not judged.
    assert d.check_resent(0, c, {0: {c[0]}, 1: {bytes(32), c[1]}, 3: {c[3]}}) == []
    assert not d._pending_fraud
    assert d.check_resent(1, c, {0: {c[0]}, 2: {bytes(32)}, 3: {b"\1" * 32}}) == [2, 3]
    [(node, why)] = d._pending_fraud
    assert node == "b" and "positions 2..3, 2 rows" in why
    d.close()


def test_a_resumed_driver_keeps_the_window_states_it_checked():
    """The state statements, distrust and counts of audits from window states are saved with the
    session, so a driver resumed from its status audits earlier windows from the states too; a
    status saved before they were kept loads with none."""
    import json

    old = SessionState(session="ns/s", prompt_tokens=[1, 2], nodes=["a", "b", "c"], epochs=[1, 1, 1]).to_json()
    for k in ("window_states", "untrusted_states", "state_audits"):
        del old[k]
    assert SessionState.from_json(old).window_states == [{}, {}, {}]
    state = SessionState.from_json(old)
    state.window_states[1]["16"] = ["b", 1, 16, "ab" * 32]
    state.untrusted_states.append(2)
    state.state_audits["windows"] = 3
    saved = SessionState.from_json(json.loads(json.dumps(state.to_json())))
    d = SessionDriver(session="ns/s", model_path="unused.gguf", split=[LayerRange(0, 9), LayerRange(10, 19),
                                                                       LayerRange(20, 29)],
                      n_layers=30, endpoints={}, state=saved, policy=LocalPolicy(["a", "b", "c"]), audit_from_state=True)
    assert d._signed_state(1, 16) == ("b", 1, 16, bytes.fromhex("ab" * 32)) and d._signed_state(1, 32) is None
    assert saved.untrusted_states == [2] and d.state_audits["windows"] == 3 and d.state_audits["state_differs"] == 0
    d.close()


def test_window_selection_draws_once_for_the_prompt_and_once_per_window_after_it():
    """Audits from window states select whole state windows; every window the prompt's batch touches
    is audited by replaying that batch whole, so they share one draw: the prompt costs one window's
    odds of a replay, however many windows it spans."""
    prompt = list(range(30))
    for seed in range(40):
        st = SessionState(session="s", prompt_tokens=prompt, nodes=["a", "b", "c"], epochs=[1, 1, 1],
                          audit_probability=0.2, audit_seed=seed, audit_window=4)
        for s in range(3):
            picks = [st.selected(s, p) for p in range(64)]
            # positions 0..31: the windows holding the prompt (the last, 28..31, also two decode rows)
            assert len(set(picks[:32])) == 1
            for w in range(32, 64, 4):
                assert len(set(picks[w:w + 4])) == 1
    # Each window after the prompt, and the prompt as one, drawn with the probability.
    draws = [SessionState(session="s", prompt_tokens=prompt, nodes=["a"], epochs=[1], audit_probability=0.2,
                          audit_seed=seed, audit_window=4).selected(0, p)
             for seed in range(500) for p in (0, 32, 60)]
    assert 0.15 < sum(draws) / len(draws) < 0.25


class _NoBackups(LocalPolicy):
    """Verifiers as usual, but no node may take a stage over (a backup selector nobody matches)."""

    def choose_backup(self, stage, failed, candidates):
        raise NoCandidate(f"no backup for stage {stage}")


def test_a_rollback_that_finds_no_backup_leaves_its_cut_to_abandon(tmp_path, model_path):
    """A cheater caught on stage 1 with no node to take its stage over: the rollback quarantines it,
    truncates the other stages, then cannot fail stage 1 over, and the session cannot go on.
    abandon() says from where its tokens are not to be kept (the rollback's cut, which its rows
    reach back to) and keeps the cheater quarantined, so that a failed session shows none of them."""
    servers, endpoints = start_agents(tmp_path, {"H": None, "C": "skip-layer"})
    state = SessionState(session="no-backup", prompt_tokens=PROMPT, nodes=["H", "C", "H"], epochs=[1, 1, 1],
                         audit_probability=1.0)
    driver = SessionDriver(session=state.session, model_path=model_path, split=SPLIT, n_layers=30,
                           endpoints=endpoints, state=state, policy=_NoBackups(["H", "C"]), rpc_timeout_s=10.0)
    with pytest.raises(NoCandidate):
        generate_then_stop(driver, servers)
    at, why = driver.abandon()
    assert state.quarantined == ["C"] and state.rollbacks == []   # begun, never finished
    assert at == 0, (at, why)   # C computed every position since the prompt's first, none of it passed
    assert "did not finish" in why, why
