"""An audit whose verifier fails to run it (its audit process died) is tried again on another node.

Three real agents on loopback ports in this process, every unit selected for audit. Before the
session, the audit process of A, the verifier the policy prefers, is killed: A's first audit is
refused INTERNAL (A's agent is up; its next audit starts a new process). The units of that audit go
to the other node that is not their worker, and every selected unit is judged.
"""
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
MAX_TOKENS = 6


def test_units_of_an_audit_the_verifier_failed_are_judged_on_another_node(tmp_path, model_path):
    with LocalPipeline(model_path, None, StageConfig(threads=1)) as pipe:
        want = generation.generate(pipe, PROMPT, MAX_TOKENS).tokens
    servers, services, endpoints = {}, {}, {}
    for n in ("A", "B", "C"):
        ident = NodeIdentity.load_or_create(tmp_path / f"{n}.pem", n)
        servers[n], services[n], port = server.serve(ident, "127.0.0.1:0",
                                                     server.AgentConfig(node_id=n, threads=1, n_ctx=256))
        endpoints[n] = f"127.0.0.1:{port}"
    pool = services["A"].audits._running()
    for p in list(pool._processes.values()):
        p.kill()
        p.join()
    state = SessionState(session="verifier-down", prompt_tokens=PROMPT, nodes=["A", "B", "C"], epochs=[1, 1, 1],
                         audit_probability=1.0)
    driver = SessionDriver(session=state.session, model_path=model_path, split=SPLIT, n_layers=30,
                           endpoints=endpoints, state=state, policy=LocalPolicy(["A", "B", "C"]),
                           rpc_timeout_s=30.0)
    try:
        driver.start()
        got = generation.generate(driver, PROMPT, MAX_TOKENS).tokens
    finally:
        driver.close()
        for srv in servers.values():
            srv.stop(None)

    assert got == want
    assert driver.unjudged == []
    audits = state.audits
    assert len(audits) == driver.audits_selected > 0
    assert all(a["verdict"] == "Passed" for a in audits)
    # A verifies stages 1 and 2 by preference; the units of its failed audit went to the third node.
    moved = [a for a in audits if a["stage"] > 0 and a["verifier"] != "A"]
    assert moved and all(a["verifier"] != a["node"] for a in audits)
    assert any(a["verifier"] == "A" for a in audits)   # and A's next audit ran in a new process


def test_an_audit_on_a_node_that_stops_answering_moves_on_before_its_deadline(tmp_path, model_path):
    """H, the verifier the policy prefers, serves no stage and is stopped (SIGSTOP: its socket stays
    open, nothing answers) during the session. Its audit in flight would wait for the load deadline
    (60 s here); the driver's Health probe finds H silent within the RPC deadline, declares it dead,
    and its units are judged on the other nodes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    with LocalPipeline(model_path, None, StageConfig(threads=1)) as pipe:
        want = generation.generate(pipe, PROMPT, MAX_TOKENS).tokens
    servers, endpoints = {}, {}
    for n in ("A", "B"):
        ident = NodeIdentity.load_or_create(tmp_path / f"{n}.pem", n)
        servers[n], _, port = server.serve(ident, "127.0.0.1:0", server.AgentConfig(node_id=n, threads=1, n_ctx=256))
        endpoints[n] = f"127.0.0.1:{port}"
    port_file = tmp_path / "H.port"
    h = subprocess.Popen([sys.executable, "-m", "node_agent.main", "--listen", "127.0.0.1:0", "--port-file",
                          str(port_file), "--key-file", str(tmp_path / "H.pem"), "--node-id", "H", "--plaintext",
                          "--threads", "1", "--ctx", "256"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not port_file.is_file():   # waiting for the agent to bind its port
            assert h.poll() is None and time.monotonic() < deadline, "agent H did not start"
            time.sleep(0.05)
        endpoints["H"] = f"127.0.0.1:{int(port_file.read_text())}"
        state = SessionState(session="verifier-hangs", prompt_tokens=PROMPT, nodes=["A", "B", "A"], epochs=[1, 1, 1],
                             audit_probability=1.0)
        driver = SessionDriver(session=state.session, model_path=model_path, split=SPLIT, n_layers=30,
                               endpoints=endpoints, state=state, policy=LocalPolicy(["H", "A", "B"]),
                               rpc_timeout_s=2.0, load_timeout_s=60.0)
        stopped = []

        def on_stage(s, position):
            if not stopped and position == len(PROMPT) + 1:
                os.kill(h.pid, signal.SIGSTOP)
                stopped.append(time.monotonic())
        driver.on_stage = on_stage
        try:
            driver.start()
            got = generation.generate(driver, PROMPT, MAX_TOKENS).tokens
        finally:
            driver.close()
    finally:
        h.send_signal(signal.SIGKILL)
        h.wait()
        for srv in servers.values():
            srv.stop(None)

    assert stopped and got == want
    assert "H" in driver.dead and driver.unjudged == []
    assert len(state.audits) == driver.audits_selected and all(a["verdict"] == "Passed" for a in state.audits)
    assert {a["verifier"] for a in state.audits} - {"H"}   # the rest were judged elsewhere
    waited = [r.ms for r in driver.rpc.records if r.node == "H" and r.method == "Audit" and not r.ok]
    assert waited and max(waited) < 30_000, waited   # given up on long before the 60 s deadline


@pytest.mark.parametrize("stall_s, deadline_s, killed", [(2.0, 60.0, True), (1000.0, 8.0, False)],
                         ids=["agent-kills-it", "driver-deadline"])
def test_a_stuck_audit_process_is_killed_and_its_audit_judged_elsewhere(tmp_path, model_path, stall_s, deadline_s,
                                                                      killed):
    """H serves stage 2 and is the verifier the policy prefers; its audit process is stopped
    (SIGSTOP) before the session, while H's agent answers Health and serves its stage. Before, its
    first audit waited the load deadline and H was then declared dead. Now H's agent kills the
    process once it has advanced by nothing for audit_stall_s and refuses the audit INTERNAL; or,
    with the driver's deadline first, the driver finds H still answering Health and takes the audit
    as failed there, not H as dead. Either way those units are judged elsewhere and H serves its
    stage to the end."""
    import os
    import signal

    with LocalPipeline(model_path, None, StageConfig(threads=1)) as pipe:
        want = generation.generate(pipe, PROMPT, MAX_TOKENS).tokens
    servers, services, endpoints = {}, {}, {}
    for n in ("A", "B", "H"):
        ident = NodeIdentity.load_or_create(tmp_path / f"{n}.pem", n)
        config = server.AgentConfig(node_id=n, threads=1, n_ctx=256, audit_stall_s=stall_s)
        servers[n], services[n], port = server.serve(ident, "127.0.0.1:0", config)
        endpoints[n] = f"127.0.0.1:{port}"
    stuck = services["H"].audits.pid()
    assert stuck is not None
    os.kill(stuck, signal.SIGSTOP)
    state = SessionState(session="audit-process-stuck", prompt_tokens=PROMPT, nodes=["A", "B", "H"],
                         epochs=[1, 1, 1], audit_probability=1.0)
    driver = SessionDriver(session=state.session, model_path=model_path, split=SPLIT, n_layers=30,
                           endpoints=endpoints, state=state, policy=LocalPolicy(["H", "A", "B"]),
                           rpc_timeout_s=30.0, load_timeout_s=deadline_s)
    try:
        driver.start()
        got = generation.generate(driver, PROMPT, MAX_TOKENS).tokens
    finally:
        try:
            os.kill(stuck, signal.SIGKILL)   # where the watchdog left it: H's release at close waits on it
        except ProcessLookupError:
            pass
        driver.close()
        for srv in servers.values():
            srv.stop(None)

    assert got == want
    assert services["H"].audits.stalls == int(killed)
    assert "H" not in driver.dead and state.failovers == [] and state.nodes == ["A", "B", "H"]
    assert driver.unjudged == [] and len(state.audits) == driver.audits_selected > 0
    assert all(a["verdict"] == "Passed" and a["verifier"] != a["node"] for a in state.audits)
    refused = [r.ms for r in driver.rpc.records if r.node == "H" and r.method == "Audit" and not r.ok]
    assert refused and max(refused) < 30_000, refused   # not the 60 s deadline
