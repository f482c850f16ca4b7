"""Operator restart mid-session, stale epochs, and quarantined nodes, on the real API server."""
from __future__ import annotations

import json
import time

import grpc
import pytest

from consortium import resources as r
from consortium import kube, receipt_check, testbed, wire
from consortium.driver.state import SessionState, audit_records, counters_of_report
from consortium.wire import pb

pytestmark = pytest.mark.k8s

MAX_TOKENS = testbed.TEST_MAX_TOKENS


@pytest.fixture()
def agents_up(bed):
    """Every agent serving (an earlier test may have killed one); a restarted one registers again."""
    for name, labels in testbed.NODE_LABELS.items():
        if bed.agents[name].poll() is not None:
            bed.start_agent(name, labels)
    return bed


def _stub(bed, node):
    return wire.pb_grpc.NodeAgentStub(bed.channel(node))


def test_operator_restart_resumes_without_recomputing(agents_up, baseline):
    """Signing per window of 8 (test_session covers the default): the agents hold rows they have not
    signed yet when the operator dies, and its successor collects them."""
    bed = agents_up
    ns, name = "restart", "resume-me"
    bed.cluster.kubectl("create", "namespace", ns)
    body = testbed.sky_is_blue(MAX_TOKENS, name)
    body["spec"].update(signing="PerWindow", receiptWindow=8)
    bed.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
    bed.wait_phase(name, ns, ("Running",), 120)
    # Stage 0's node at token 12, as its counters say (status is written seconds apart at times).
    bed.wait_token(name, ns, bed.get("stageassignment", f"{name}-s0", ns)["spec"]["nodeName"], 0, 12, 180)
    bed.kill_operator()
    saved = bed.session(name, ns)["status"]
    assert saved["phase"] == "Running" and 1 <= saved["position"] < MAX_TOKENS
    bed.start_operator()
    s = bed.wait_phase(name, ns, ("Completed",), 300)
    assert s["status"]["tokens"] == baseline
    P = len(s["status"]["report"]["driverState"]["prompt_tokens"])
    fed_before = P + saved["position"] - 1   # positions every stage had computed when status was saved
    # The agents' own forward counters, as the operator read them from each agent at the end: the
    # session, over, was released there since (the counters with its slots).
    forward = {}
    for rows in counters_of_report(s["status"]["report"]["counters"]).values():
        for stage, position, fwd, _ in rows:
            forward[(stage, position)] = forward.get((stage, position), 0) + fwd
    for node in testbed.NODE_LABELS:
        assert not _stub(bed, node).Health(pb.HealthRequest(session=bed.session_id(name, ns)), timeout=10).counters
    for stage in range(3):
        before = [forward.get((stage, p), 0) for p in range(fed_before)]
        assert before and all(n == 1 for n in before), (stage, before)
        assert forward.get((stage, P + MAX_TOKENS - 2), 0) == 1   # and it went on to the end
    assert "Resumed" in [e["reason"] for e in bed.events(ns, name)]
    items = bed.get("receipts", namespace=ns, selector=f"consortium.io/session={name}")["items"]
    # Every unit the seeded selection picked, before the restart too, was judged or is reported
    # unjudged with a reason: none vanished with the operator that had queued it.
    drv = s["status"]["report"]["driverState"]
    state = SessionState.from_json(drv)
    selected = {(st, p) for st in range(3) for p in range(0 if st < 2 else P - 1, state.done[st])
                if state.selected(st, p)}
    accounted = {(a["stage"], a["position"]) for a in audit_records(drv) + drv["unjudged"]}
    assert selected and selected <= accounted, sorted(selected - accounted)
    # Judged, in fact: the final stage's node still keeps the logit rows the driver needs.
    assert not [u for u in drv["unjudged"] if "coordinator stopped" in u["reason"]], drv["unjudged"]
    windows = [r["spec"]["window"] for r in items]
    assert windows and all(w["count"] <= 8 and w["start"] // 8 == (w["start"] + w["count"] - 1) // 8
                           for w in windows)
    assert sum(w["count"] == 8 for w in windows) >= 3


def test_agent_refuses_an_epoch_its_assignment_moved_past(agents_up):
    from consortium.models import resolve_model

    bed = agents_up
    ns, session = "stale", "stale-epoch"
    bed.cluster.kubectl("create", "namespace", ns)
    stub = _stub(bed, "n0")
    ref = pb.StageRef(session=r.session_id(ns, session), stage=0, epoch=1)
    # A session of the same name in another namespace, on the same agent: its stage must not be fenced.
    other = pb.StageRef(session=r.session_id("elsewhere", session), stage=0, epoch=1)
    for x in (ref, other):
        stub.LoadStage(pb.LoadStageRequest(ref=x, model_path=str(resolve_model(None)), first_layer=0, last_layer=9),
                       timeout=120)
        stub.Forward(pb.ForwardRequest(ref=x, position=0, tokens=[1, 2, 3]), timeout=60)
    # The control plane moves stage 0 to n1 at epoch 2 (as a failover would); n0 never hears it by RPC.
    sa = {"apiVersion": "consortium.io/v1alpha1", "kind": "StageAssignment",
          "metadata": {"name": f"{session}-s0", "namespace": ns},
          "spec": {"session": session, "stageIndex": 0, "layers": {"start": 0, "end": 9}, "nodeName": "n1",
                   "epoch": 2}}
    bed.cluster.kubectl("apply", "-f", "-", input=json.dumps(sa))

    def refused():
        try:
            stub.Truncate(pb.TruncateRequest(ref=ref, position=3), timeout=10)
            return False
        except grpc.RpcError as e:
            return e
    e = testbed.wait_until(refused, 30, "n0 to fence itself")
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "stale epoch 1" in e.details()
    with pytest.raises(grpc.RpcError) as exc:
        stub.Forward(pb.ForwardRequest(ref=ref, position=3, tokens=[4]), timeout=10)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stub.Forward(pb.ForwardRequest(ref=other, position=3, tokens=[4]), timeout=60).output_position == 3


def test_a_quarantined_node_gets_no_new_stage(agents_up):
    bed = agents_up
    ns, name = "quarantine", "waits"
    bed.cluster.kubectl("create", "namespace", ns)
    bed.set_quarantined("n1", True)   # the only node matching stage 0's cuda+worker selector
    try:
        bed.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(testbed.sky_is_blue(4, name)))

        def unschedulable():
            st = bed.session(name, ns).get("status") or {}
            c = next((c for c in st.get("conditions") or [] if c["type"] == "Scheduled"), None)
            return c if c and c["status"] == "False" else None
        c = testbed.wait_until(unschedulable, 60, "Scheduled=False")
        assert c["reason"] == "Unschedulable" and "n1: quarantined" in c["message"], c
        assert bed.session(name, ns)["status"]["phase"] == "Scheduling"
        assert bed.cluster.kubectl("get", "stageassignment", f"{name}-s0", "-n", ns, check=False).returncode != 0
        # Posted right after the condition is written: asked until it has come.
        testbed.wait_until(lambda: "Unschedulable" in [e["reason"] for e in bed.events(ns, name)], 30,
                           "the Unschedulable Event")
    finally:
        bed.set_quarantined("n1", False)
    # Lifted: the session is placed and runs.
    s = bed.wait_phase(name, ns, ("Completed",), 180)
    assert bed.get("stageassignment", f"{name}-s0", ns)["spec"]["nodeName"] == "n1"
    assert len(s["status"]["tokens"]) == 4


@pytest.mark.parametrize("at_token", [10, MAX_TOKENS - 3], ids=["mid-session", "in-the-last-tokens"])
def test_a_node_quarantined_elsewhere_is_dropped_by_a_running_session(agents_up, baseline, at_token):
    """n2 serves stage 1 of a session that audits nothing; mid-session, or a few tokens before its
    end, its ComputeNode turns Quarantined (as another session's verdicts would make it). The session
    treats it as caught: rolled back to the first position n2 computed since a passed audit here
    (none: the prompt), its stage failed over, and the tokens are the baseline's. Before, the session
    went on with n2; and one that ended within the second between two looks at the nodes completed
    with n2's work (the session now looks once more before it completes)."""
    bed = agents_up
    ns, name = f"quarantined-at-{at_token}", "drops-it"
    bed.cluster.kubectl("create", "namespace", ns)
    bed.cluster.kubectl("apply", "-n", ns, "-f", "-",
                        input=json.dumps(testbed.sky_is_blue(MAX_TOKENS, name, audit_probability=0.0)))
    try:
        bed.wait_token(name, ns, "n2", 1, at_token, 120)
        bed.set_quarantined("n2", True)
        s = bed.wait_phase(name, ns, ("Completed",), 300)
    finally:
        bed.set_quarantined("n2", False)
    assert s["status"]["tokens"] == baseline
    drv = s["status"]["report"]["driverState"]
    assert drv["quarantined"] == ["n2"]
    assert [(rb["node"], rb["to_position"]) for rb in drv["rollbacks"]] == [("n2", 0)]
    assert "quarantined in the cluster" in drv["rollbacks"][0]["reason"]
    assert [(f["stage"], f["from"]) for f in drv["failovers"]] == [(1, "n2")]
    assert bed.get("stageassignment", f"{name}-s1", ns)["spec"]["nodeName"] != "n2"


def test_a_session_deleted_and_applied_again_under_its_name_runs(agents_up, baseline):
    """`kubectl delete` then `kubectl apply` of the same manifest: the agents still fence the old
    session's epochs (so that its late requests are refused), and the new one used to fail at once
    on them ("stale epoch 1 ... fenced at epoch 2"). Its uid makes it another session to them."""
    bed = agents_up
    ns, name = "again", "same-name"
    bed.cluster.kubectl("create", "namespace", ns)
    ids = []
    for _ in range(2):
        bed.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(testbed.sky_is_blue(4, name)))
        s = bed.wait_phase(name, ns, ("Completed",), 120)
        assert s["status"]["tokens"] == baseline[:4]
        ids.append(bed.session_id(name, ns))
        # Its receipts verify under the id it ran with (a namesake's, not yet collected, do not count).
        items = bed.get("receipts", namespace=ns, selector=f"{r.GROUP}/session={name}")["items"]
        res = receipt_check.check(s, items, bed.get("computenodes")["items"])
        assert res["ok"] and res["verified"] == res["receipts"] > 0, res
        bed.cluster.kubectl("delete", "inferencesession", name, "-n", ns, "--wait=true")
    assert ids[0] != ids[1]


def test_a_session_deleted_mid_generation_stops_and_frees_its_agents(agents_up):
    """`kubectl delete` of a running session: the deletion completes, the operator stops driving it
    without failing or crashing on the object that is gone, and every agent gives back its slots
    (its forward counters go with them) instead of holding them for a session nobody runs."""
    bed = agents_up
    ns, name = "deleted-mid", "goes-away"
    bed.cluster.kubectl("create", "namespace", ns)
    bed.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(testbed.sky_is_blue(1024, name)))
    bed.wait_token(name, ns, "n2", 1, 10, 120)
    sid = bed.session_id(name, ns)
    log_from = len(bed.operator_log())
    bed.cluster.kubectl("delete", "inferencesession", name, "-n", ns, "--wait=true", "--timeout=60s")

    def released():
        return all(not _stub(bed, node).Health(pb.HealthRequest(session=sid), timeout=10).counters
                   for node in testbed.NODE_LABELS)
    testbed.wait_until(released, 30, "every agent to release the deleted session")
    assert bed.operator.poll() is None
    after = bed.operator_log()[log_from:]
    assert "Traceback" not in after and f"session {name} failed" not in after, after[-3000:]


@pytest.mark.parametrize("graceful", [False, True], ids=["killed", "stopped"])
def test_a_session_rides_out_an_api_server_restart(agents_up, baseline, graceful):
    """The API server dies mid-session (a crash, a k3s server's reboot) and is away for 12 s and
    more: every write the operator makes meanwhile fails, and no agent can renew its Lease (10 s).
    Or it is stopped (SIGTERM, as an upgrade does): it refuses connections at once and drains for
    about a minute before it exits (62 s from the signal to ready again here), then is away 2 s.
    Generation does not need the API: the session goes on (here to the end of its answer, while the
    API is still away), writes its receipts and its end once the API is back, and completes with no
    failover, its tokens the baseline's and every position covered by a receipt that verifies.
    Before, the first failed progress write failed the session, and kopf's retry of it, resuming
    on agents that had released it, failed every stage over and ended Failed with no token."""
    bed = agents_up
    ns, name = f"apiserver-restart-{'stopped' if graceful else 'killed'}", "rides-it-out"
    n = 1024
    bed.cluster.kubectl("create", "namespace", ns)
    bed.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(testbed.sky_is_blue(n, name)))
    bed.wait_token(name, ns, "n2", 1, 10, 120)
    down_s = bed.cluster.restart_apiserver(down_s=2.0 if graceful else 12.0, graceful=graceful)
    s = bed.wait_phase(name, ns, ("Completed",), 300)
    st = s["status"]
    assert st["report"]["driverState"]["failovers"] == []
    assert st["tokens"][:MAX_TOKENS] == baseline
    assert len(st["tokens"]) == n or st["report"]["stopped"] == "end_of_generation", st["report"]["stopped"]
    items = bed.get("receipts", namespace=ns, selector=f"{r.GROUP}/session={name}")["items"]
    res = receipt_check.check(s, items, bed.get("computenodes")["items"])
    assert res["ok"] and res["complete"], (down_s, receipt_check.lines(res))


def test_a_hung_api_server_holds_up_no_token(agents_up, baseline):
    """The API server stops answering mid-session for 12 s, its connections open (a stopped process,
    a link that drops packets), longer than the agents' Leases last. Generation does not wait for
    it: the tokens come out meanwhile, the session's writes follow once it answers, and no node is
    failed over for the Leases it could not renew. Before, the progress writes and the node watch's
    reads were made in the token loop, which waited on them for as long as the server hung: stage 1
    moved 3 positions, then none."""
    bed = agents_up
    ns, name = "apiserver-hang", "keeps-going"
    bed.cluster.kubectl("create", "namespace", ns)
    bed.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(testbed.sky_is_blue(1024, name)))
    bed.wait_token(name, ns, "n2", 1, 10, 120)
    sid = bed.session_id(name, ns)   # before the hang: it reads the API
    seen = []

    def during():   # stage 1's position, until the session ends there or stalls for 3 s
        first = last = bed.stage_position("n2", sid, 1)
        still, until = time.monotonic(), time.monotonic() + 11
        while time.monotonic() < until and time.monotonic() - still < 3:
            time.sleep(0.2)
            p = bed.stage_position("n2", sid, 1)
            if p is None:   # released: generation ended
                break
            if p > last:
                last, still = p, time.monotonic()
        seen.extend([first, last])

    bed.cluster.pause_apiserver(12.0, while_paused=during)
    s = bed.wait_phase(name, ns, ("Completed",), 300)
    st = s["status"]
    P = len(st["report"]["driverState"]["prompt_tokens"])
    # Every token but the first ten came out while the server hung (the answer ends before 1,024).
    assert seen[1] - seen[0] >= min(100, len(st["tokens"]) - 12), (seen, len(st["tokens"]), P)
    assert st["report"]["driverState"]["failovers"] == []
    assert st["tokens"][:MAX_TOKENS] == baseline
    items = bed.get("receipts", namespace=ns, selector=f"{r.GROUP}/session={name}")["items"]
    res = receipt_check.check(s, items, bed.get("computenodes")["items"])
    assert res["ok"] and res["complete"], receipt_check.lines(res)


def test_a_node_lost_while_the_api_server_is_away_is_failed_over(agents_up, baseline):
    """Stage 1's agent is killed while the API server is down: the backup is chosen from the last
    reading of the ComputeNodes, takes over by RPC, and the StageAssignment follows once the API is
    back. Before, the failover failed on its first write and with it the session."""
    bed = agents_up
    ns, name = "failover-api-away", "no-api"
    bed.cluster.kubectl("create", "namespace", ns)
    bed.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(testbed.sky_is_blue(1024, name)))
    bed.wait_token(name, ns, "n2", 1, 10, 120)
    bed.cluster.restart_apiserver(down_s=4.0, while_down=lambda: bed.kill_agent("n2"))
    s = bed.wait_phase(name, ns, ("Completed",), 300)
    st = s["status"]
    drv = st["report"]["driverState"]
    assert [(f["stage"], f["from"], f["epoch"]) for f in drv["failovers"]] == [(1, "n2", 2)], drv["failovers"]
    assert st["tokens"][:MAX_TOKENS] == baseline
    sa = bed.get("stageassignment", f"{name}-s1", ns)["spec"]
    assert (sa["nodeName"], sa["epoch"]) == (drv["failovers"][0]["to"], 2), sa
    items = bed.get("receipts", namespace=ns, selector=f"{r.GROUP}/session={name}")["items"]
    res = receipt_check.check(s, items, bed.get("computenodes")["items"])
    assert res["ok"] and res["complete"], receipt_check.lines(res)


def test_an_agent_started_while_the_api_server_is_away_registers_once_it_is_back(agents_up):
    """A bare agent started before its control plane answers (k3s still booting, restarting) waits
    for it, saying so, and registers once it is back. Before, the agent exited at once with a
    traceback, and nothing starts a bare agent again."""
    bed = agents_up
    name = "late-agent"
    kubeconfig = bed.agent_kubeconfig(name)   # its token is made while the API answers
    try:
        bed.cluster.restart_apiserver(down_s=3.0, while_down=lambda: bed.start_agent(
            name, {r.LABEL_ACCELERATOR: "cpu"}, kubeconfig=kubeconfig, wait=False))
        bed.wait_agent(name)
        cn = bed.get("computenode", name)
        assert kube.condition_true(cn, "Ready") and not cn["spec"].get("approved"), cn
        log = (bed.workdir / f"agent-{name}.log").read_text()
        assert "control plane not reachable" in log and "registering again" in log, log[-2000:]
    finally:
        bed.kill_agent(name)
        bed.cluster.kubectl("delete", "computenode", name, "--ignore-not-found")
        bed.cluster.kubectl("delete", "lease", kube.lease_name(name), "-n", testbed.NS, "--ignore-not-found")
        bed.cluster.kubectl("delete", "node", name, "--ignore-not-found")   # revokes its token


def test_a_status_at_its_budget_stops_generation_with_a_reason(agents_up, baseline, monkeypatch):
    """An operator whose status budget is smaller than any session's first write (the default, 1.25
    MiB, sits below etcd's limit): the session stops after the token that write carried, Completed
    with report.stopped status_full and a StatusFull Event, instead of writing on until the API
    server refuses every write."""
    bed = agents_up
    ns, name = "budget", "stops-early"
    bed.cluster.kubectl("create", "namespace", ns)
    bed.kill_operator()
    monkeypatch.setenv("CONSORTIUM_STATUS_BUDGET_BYTES", "1")
    bed.start_operator()
    try:
        bed.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(testbed.sky_is_blue(MAX_TOKENS, name)))
        s = bed.wait_phase(name, ns, ("Completed", "Failed"), 300)
    finally:
        bed.kill_operator()
        monkeypatch.delenv("CONSORTIUM_STATUS_BUDGET_BYTES")
        bed.start_operator()
    st = s["status"]
    assert st["phase"] == "Completed" and st["report"]["stopped"] == "status_full", st.get("conditions")
    assert st["tokens"] == baseline[:1]
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["message"] == "1 tokens (status_full)", ready
    events = bed.cluster.kubectl("get", "events", "-n", ns, "-o", "json")
    full = [e for e in json.loads(events.stdout)["items"] if e["reason"] == "StatusFull"]
    assert len(full) == 1 and "generation stops there" in full[0]["message"], full
