"""Test Case v1 through the operator on a real API server: placement by labels, the session driver
as a kopf daemon, receipts and verdicts as objects, and failover when stage 1's agent is SIGKILLed."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import threading

import pytest

from consortium import follow, metrics, testbed
from consortium.driver.state import audit_records
from consortium.testbed import TEST_MAX_TOKENS as MAX_TOKENS

pytestmark = pytest.mark.k8s

NS = "tc-v1"
KILL_AT = 20


class CountingView(follow.SessionView):
    """A SessionView that counts the snapshots that showed more text than the one before."""
    growths = 0

    def update(self, obj):
        before = len(self.printed)
        super().update(obj)
        self.growths += len(self.printed) > before


class Follower:
    """`consortium follow` of the session, in a thread from its creation on: what a person watching
    it was told."""

    def __init__(self, api):
        self.out, self.err = io.StringIO(), io.StringIO()
        self.view = CountingView(self.out, self.err)
        self.error = None
        self._thread = threading.Thread(target=self._run, args=(api,), daemon=True)

    def start(self):
        self._thread.start()

    def _run(self, api):
        try:
            follow.follow(NS, "sky-is-blue", self.view, timeout_s=300, api=api)
        except Exception as e:  # noqa: BLE001 - the test reads it
            self.error = e

    def join(self):
        self._thread.join(30)


@pytest.fixture(scope="module")
def follower(bed):
    return Follower(bed.api())


@pytest.fixture(scope="module")
def completed(bed, baseline, follower):
    bed.cluster.kubectl("create", "namespace", NS)
    body = testbed.sky_is_blue(MAX_TOKENS)
    bed.cluster.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(body))
    follower.start()
    s = bed.wait_phase("sky-is-blue", NS, ("Running",), 120)
    victim = bed.get("stageassignment", "sky-is-blue-s1", NS)["spec"]["nodeName"]
    # Killed once it has computed its row of token KILL_AT's step, as its own counters say: status
    # is written seconds apart at times, and a short session can end between two writes.
    bed.wait_token("sky-is-blue", NS, victim, 1, KILL_AT, 180)
    bed.kill_agent(victim)
    s = bed.wait_phase("sky-is-blue", NS, ("Completed",), 300)
    follower.join()
    return s, victim


def test_a_follower_saw_the_text_grow_the_failover_and_the_outcome(completed, follower):
    s, victim = completed
    assert follower.error is None and follower.view.finished()
    assert follower.out.getvalue() == s["status"]["text"] + "\n"
    assert follower.view.growths >= 3   # streamed while generating, not printed at the end
    told = follower.err.getvalue()
    assert f"StageFailover True StageLost: stage 1 lost {victim}" in told, told
    assert f"StageFailover False FailoverCompleted: stage 1: {victim} -> n0" in told, told
    assert "] Completed\n" in told and f"{MAX_TOKENS} tokens" in told
    m = s["status"]["metrics"]
    assert f"audits: {m['auditsPassed']} passed" in told and f"receipts {m['receipts']}" in told


def test_its_report_from_the_api_and_from_an_archive_says_the_same(completed, bed, tmp_path):
    s, victim = completed

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "consortium.cli", *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
    kc = ["--kubeconfig", bed.cluster.kubeconfig, "-n", NS]
    live = cli("report", "sky-is-blue", *kc, "--out", str(tmp_path / "live"))
    assert live.returncode == 0, live.stderr
    assert live.stdout.startswith(f"Completed (max_tokens): {MAX_TOKENS} tokens") and "receipts verify" in live.stdout
    r = json.loads((tmp_path / "live" / "report.json").read_text())
    drv = s["status"]["report"]["driverState"]
    assert r["tokens"] == MAX_TOKENS and r["audits"]["total"] == len(audit_records(drv)) > 0
    assert [(f["stage"], f["from"]) for f in r["failovers"]] == [(1, victim)]
    assert r["receipts"]["ok"] and r["receipts"]["complete"] and r["receipts"]["tokens_signed"] >= MAX_TOKENS - 2
    assert sum(st["failover"] for st in r["steps"]) == 1 and r["step_ms"]["median"] > 0
    assert (tmp_path / "live" / "latency.png").read_bytes()[:4] == b"\x89PNG"
    summary = (tmp_path / "live" / "summary.md").read_text()
    assert "## Failovers" in summary and f"| 1 | {victim} | {r['failovers'][0]['to']} |" in summary
    assert "OK: all" in summary

    assert cli("archive", "sky-is-blue", *kc, "-o", str(tmp_path / "a.json.gz")).returncode == 0
    offline = cli("report", "--archive", str(tmp_path / "a.json.gz"), "--out", str(tmp_path / "offline"))
    assert offline.returncode == 0 and offline.stdout == live.stdout, offline.stderr
    assert json.loads((tmp_path / "offline" / "report.json").read_text()) == r


def test_placement_follows_the_seeds_roles(completed, bed):
    s, victim = completed
    nodes = {i: bed.get("stageassignment", f"sky-is-blue-s{i}", NS) for i in range(3)}
    # Stage 1 began on the only metal-labeled node and failed over to the coordinator.
    assert victim == "n2"
    assert nodes[1]["spec"]["nodeName"] == "n0" and nodes[1]["spec"]["epoch"] == 2
    assert nodes[0]["spec"]["nodeName"] == "n1" and nodes[0]["spec"]["epoch"] == 1
    assert nodes[2]["spec"]["nodeName"] == "n0" and nodes[2]["spec"]["epoch"] == 1
    for sa in nodes.values():
        owner = sa["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "InferenceSession" and owner["uid"] == s["metadata"]["uid"]
    sched = next(c for c in s["status"]["conditions"] if c["type"] == "Scheduled")
    assert "stage 1 -> n2 (cpu (labeled metal))" in sched["message"], sched


def test_tokens_equal_the_baseline(completed, baseline):
    s, _ = completed
    assert s["status"]["phase"] == "Completed"
    assert s["status"]["tokens"] == baseline
    assert s["status"]["position"] == len(baseline)
    assert s["status"]["stageEpochs"] == [1, 2, 1]
    # Tokens as they came out, the operator's writes between steps included, come no faster than
    # the steps alone.
    m = s["status"]["metrics"]
    assert 0 < m["tokensPerSecond"] <= m["stepTokensPerSecond"], m


def test_a_receipt_for_every_stage_and_window_with_a_verdict(completed, bed):
    s, _ = completed
    items = bed.get("receipts", namespace=NS, selector="consortium.io/session=sky-is-blue")["items"]
    drv = s["status"]["report"]["driverState"]
    # Re-checked from the API alone by the user's command: every receipt verifies under the key its
    # node publishes, and every position fed to every stage is in one.
    out = subprocess.run([sys.executable, "-m", "consortium.cli", "verify-receipts", "sky-is-blue", "-n", NS,
                          "--kubeconfig", bed.cluster.kubeconfig, "--json", "-"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads(out.stdout)
    assert res["ok"] and res["complete"] and res["verified"] == res["receipts"] == len(items), res
    assert res["tokens"] == MAX_TOKENS and res["prompt_tokens"] == len(drv["prompt_tokens"])
    assert [p["nodes"] for p in res["per_stage"]] == [["n1"], ["n0", "n2"], ["n0"]]
    verdicts = [it.get("status", {}).get("verdict") for it in items]
    assert all(v in ("Passed", "PassedWithinTolerance", "Pending") for v in verdicts), verdicts
    assert sum(v in ("Passed", "PassedWithinTolerance") for v in verdicts) >= 3
    audited = {(a["stage"], a["position"]) for a in audit_records(drv)}
    for it in items:
        positions = [a["position"] for a in (it.get("status") or {}).get("audits") or []]
        w = it["spec"]["window"]
        assert all(w["start"] <= p < w["start"] + w["count"] and (it["spec"]["stage"], p) in audited
                   for p in positions)
    # The window stage 1's dead node was filling is flushed short, under its epoch 1.
    s1 = sorted((it["spec"]["window"]["start"], it["spec"]["node"], it["spec"]["epoch"])
                for it in items if it["spec"]["stage"] == 1)
    assert any(n == "n2" and e == 1 for _, n, e in s1) and any(n == "n0" and e == 2 for _, n, e in s1)
    out = bed.cluster.kubectl("get", "receipts", "-n", NS).stdout
    assert out.splitlines()[0].split()[:5] == ["NAME", "SESSION", "STAGE", "NODE", "TOKENS"]
    assert all(v in out for v in ("Passed",))


def test_the_operators_metrics_tell_the_same_story(completed, bed):
    """What the operator serves at /metrics for Prometheus agrees with the session's saved state."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    s, _ = completed
    drv = s["status"]["report"]["driverState"]
    text = urllib.request.urlopen(bed.metrics_url, timeout=10).read().decode()
    mine = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.labels.get("session") == "sky-is-blue" and sample.labels.get("namespace") == NS:
                extra = tuple(v for k, v in sorted(sample.labels.items()) if k not in ("namespace", "session"))
                mine[(sample.name, *extra)] = sample.value
    assert mine[("consortium_session_running",)] == 0   # ended, still shown
    assert mine[("consortium_session_tokens_total",)] == MAX_TOKENS == len(s["status"]["tokens"])
    assert mine[("consortium_session_failovers_total", "1")] == 1 and mine[("consortium_session_failovers_total", "0")] == 0
    for v in ("Passed", "PassedWithinTolerance", "Mismatch", "Fraud"):
        assert mine[("consortium_session_audits_total", v)] == sum(a["verdict"] == v for a in audit_records(drv))
    assert mine[("consortium_session_receipts_total",)] >= 3 and mine[("consortium_session_rollbacks_total",)] == 0
    steps = mine[("consortium_session_steps_total",)]
    assert steps == MAX_TOKENS and 0 < mine[("consortium_session_step_seconds_total",)] < 300
    assert "process_resident_memory_bytes" in text
    # The chart's Grafana dashboard asks only for series the operator serves, with labels they have.
    served = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            served.setdefault(sample.name, set()).update(sample.labels)
    wanted = metrics.dashboard_series((testbed.ROOT / metrics.DASHBOARD).read_text(), "consortium_session")
    assert len(wanted) >= 8
    for name, labels in wanted.items():
        assert name in served and labels <= served[name], (name, labels, served.get(name))


def test_failover_in_conditions_and_events(completed, bed):
    s, victim = completed
    cond = {c["type"]: c for c in s["status"]["conditions"]}
    assert cond["StageFailover"]["status"] == "False" and cond["StageFailover"]["reason"] == "FailoverCompleted"
    assert f"{victim} -> n0" in cond["StageFailover"]["message"]
    reasons = [e["reason"] for e in bed.events(NS, "sky-is-blue")]
    for r in ("Scheduled", "FailoverStarted", "StageReassigned", "FailoverFinished", "Completed"):
        assert r in reasons, reasons
    sa = bed.get("stageassignment", "sky-is-blue-s1", NS)
    ready = next(c for c in sa["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["reason"] == "FailedOver"
    drv = s["status"]["report"]["driverState"]
    assert [(f["stage"], f["from"], f["to"]) for f in drv["failovers"]] == [(1, victim, "n0")]
    assert drv["quarantined"] == []
    # n0, the backup, loaded stage 1's layers when the session started, and the failover found them.
    assert any(p["stage"] == 1 and p["node"] == "n0" for p in s["status"]["report"]["warmBackups"])
    assert drv["failovers"][0]["backup_had_layers"] is True


def test_audits_from_window_states_through_the_operator(bed, baseline):
    """audit.fromWindowStates and stateWindow reach the driver: whole windows selected, each audited
    from the signed states before it, and the tokens are the baseline's."""
    for name, labels in testbed.NODE_LABELS.items():   # the failover test killed one; it registers again
        if bed.agents[name].poll() is not None:
            bed.start_agent(name, labels)
    ns, name = "tc-states", "sky-is-blue"   # the failover test's name, in another namespace
    bed.cluster.kubectl("create", "namespace", ns)
    body = testbed.sky_is_blue(MAX_TOKENS, name, audit_probability=0.5)
    body["spec"]["audit"].update(fromWindowStates=True, stateWindow=8)
    bed.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
    s = bed.wait_phase(name, ns, ("Completed",), 300)
    assert s["spec"]["audit"]["fromWindowStates"] is True and s["status"]["tokens"] == baseline
    drv = s["status"]["report"]["driverState"]
    assert drv["audit_window"] == 8   # the driver selected whole state windows
    verdicts = [a["verdict"] for a in audit_records(drv)]
    assert verdicts and set(verdicts) == {"Passed"} and not drv["unjudged"]
    # Agents key it by namespace, name and uid.
    assert drv["session"] == f"tc-states/sky-is-blue/{s['metadata']['uid']}"
    # The statements and counts are in the status, where a resumed operator finds them.
    fs = drv["state_audits"]
    assert fs["windows"] >= 1 and fs["state_differs"] == 0 and drv["untrusted_states"] == [], fs
    assert all(drv["window_states"][s] for s in range(3))


def test_a_deleted_namesakes_stage_assignment_is_replaced_not_taken_over(bed, baseline):
    """A session deleted and applied again under its name: the old one's StageAssignments may still
    be there (the garbage collector took over 20 s here). One left without an owner, as `kubectl
    delete --cascade=orphan` leaves them, must not be taken over (patched, it stayed the namesake's;
    with an owner, the collector removed it later under the running session): the operator replaces
    it with one the session owns."""
    from consortium import resources as r
    from consortium_operator import placement

    for name, labels in testbed.NODE_LABELS.items():   # the failover test killed one; it registers again
        if bed.agents[name].poll() is not None:
            bed.start_agent(name, labels)
    ns, name = "tc-namesake", "again"
    bed.cluster.kubectl("create", "namespace", ns)
    body = testbed.sky_is_blue(4, name)
    spec = r.InferenceSessionSpec.model_validate(body["spec"])
    left = placement.assignment_body({"metadata": {"name": name, "namespace": ns, "uid": "gone"}}, 1,
                                     spec.stages[1], "n1", 3, spec.model.to_k8s())
    del left["metadata"]["ownerReferences"]
    bed.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(left))
    bed.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
    s = bed.wait_phase(name, ns, ("Completed",), 300)
    assert s["status"]["tokens"] == baseline[:4]
    sa = bed.get("stageassignment", f"{name}-s1", ns)
    assert [o["uid"] for o in sa["metadata"]["ownerReferences"]] == [s["metadata"]["uid"]]
    assert sa["spec"]["epoch"] == 1   # made anew, not the leftover's epoch 3 rewritten


def test_a_model_without_a_tokenizer_fails_its_session_not_the_operator(bed):
    """llama.cpp aborts a process that tokenizes with a GGUF that has no tokenizer (the synthetic
    models); the operator fails that session with the reason and goes on serving."""
    from consortium.models import resolve_model

    ns, name = "tc-no-tokenizer", "ids-only"
    bed.cluster.kubectl("create", "namespace", ns)
    body = testbed.sky_is_blue(4, name)
    body["spec"]["model"] = {"name": "synthetic-llama3", "file": str(resolve_model("synthetic-llama3"))}
    for st, layers in zip(body["spec"]["stages"], ("0-1", "2-3", "4-5")):   # its 6 layers
        st["layers"] = layers
    bed.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
    s = bed.wait_phase(name, ns, ("Failed",), 120)
    ready = next(c for c in s["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "PromptNotTokenized" and "no tokenizer" in ready["message"], ready
    assert bed.operator.poll() is None   # still running


def test_a_session_ends_where_its_nodes_context_does(bed):
    """The agents hold 2048 positions a session (node-agent --ctx's default). A prompt that leaves
    room for 3 of maxTokens 8: a ContextLimit warning, then Completed with those 3 (report.stopped
    context_full; before, the next step was refused and the session failed StageLost). A prompt
    longer than the context: Failed, PromptTooLong, before any step."""
    from consortium.models import resolve_model
    from consortium.tokenizer import Tokenizer

    for name, labels in testbed.NODE_LABELS.items():   # the failover test killed one; it registers again
        if bed.agents[name].poll() is not None:
            bed.start_agent(name, labels)
    tok = Tokenizer(resolve_model(None))
    try:
        overhead = len(tok.prompt_tokens("blue")) - 1
        fits, too_long = " ".join(["blue"] * (2046 - overhead)), " ".join(["blue"] * 2100)
        assert len(tok.prompt_tokens(fits)) == 2046 and len(tok.prompt_tokens(too_long)) > 2048
    finally:
        tok.close()
    ns = "tc-context"
    bed.cluster.kubectl("create", "namespace", ns)
    for name, prompt in (("fits", fits), ("too-long", too_long)):
        body = testbed.sky_is_blue(8, name, audit_probability=0.0)
        body["spec"]["prompt"] = prompt
        bed.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
    s = bed.wait_phase("fits", ns, ("Completed", "Failed"), 300)
    assert s["status"]["phase"] == "Completed", s["status"].get("conditions")
    assert len(s["status"]["tokens"]) == 3 and s["status"]["report"]["stopped"] == "context_full"
    warned = [e["message"] for e in bed.events(ns, "fits") if e["reason"] == "ContextLimit"]
    assert warned and "stops at 3 tokens" in warned[0], warned
    s = bed.wait_phase("too-long", ns, ("Completed", "Failed"), 120)
    ready = next(c for c in s["status"]["conditions"] if c["type"] == "Ready")
    assert s["status"]["phase"] == "Failed" and ready["reason"] == "PromptTooLong", ready
    assert "do not fit the 2048 positions" in ready["message"] and not s["status"].get("tokens")


def test_a_session_waits_for_a_free_slot_and_an_ended_one_frees_its_own(bed, baseline):
    """Each agent holds 8 sequence slots a layer range. With every slot of layers 0-9 on n1 taken
    (by sessions loaded here directly, as a driver outside the operator would), a session waits in
    Scheduled=False NodesBusy (before: Failed, OperatorError, RESOURCE_EXHAUSTED), and starts once
    they are released. And a session that ends gives back its own slots: they were held until the
    session was deleted, so the ninth session in a row failed."""
    from consortium import wire
    from consortium.models import resolve_model
    from consortium.wire import pb

    for name, labels in testbed.NODE_LABELS.items():   # the failover test killed one; it registers again
        if bed.agents[name].poll() is not None:
            bed.start_agent(name, labels)
    ns = "tc-slots"
    bed.cluster.kubectl("create", "namespace", ns)
    stub = wire.pb_grpc.NodeAgentStub(bed.channel("n1"))
    squatters = []
    for i in range(16):   # until n1 refuses: every slot of stage 0's layers taken
        ref = pb.StageRef(session=f"{ns}/squatter-{i}", stage=0, epoch=1)
        try:
            stub.LoadStage(pb.LoadStageRequest(ref=ref, model_path=str(resolve_model(None)), first_layer=0,
                                               last_layer=9), timeout=60)
        except Exception as e:   # grpc.RpcError
            assert "sequence slots of layers 0-9 are in use" in e.details(), e
            break
        squatters.append(ref)
    assert 0 < len(squatters) < 16
    bed.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(testbed.sky_is_blue(4, "late")))
    testbed.wait_until(lambda: any(c["type"] == "Scheduled" and c["reason"] == "NodesBusy"
                                   for c in (bed.session("late", ns).get("status") or {}).get("conditions") or []),
                       120, "NodesBusy")
    assert "NodesBusy" in [e["reason"] for e in bed.events(ns, "late")]
    for ref in squatters:
        stub.Release(pb.ReleaseRequest(ref=ref), timeout=10)
    s = bed.wait_phase("late", ns, ("Completed",), 300)
    assert s["status"]["tokens"] == baseline[:4]
    assert next(c for c in s["status"]["conditions"] if c["type"] == "Scheduled")["reason"] == "Placed"
    sid = bed.session_id("late", ns)
    for node in testbed.NODE_LABELS:   # ended: released on every agent (its counters went with its slots)
        got = wire.pb_grpc.NodeAgentStub(bed.channel(node)).Health(pb.HealthRequest(session=sid), timeout=10)
        assert not got.counters, node
