"""Randomized fault trials through Kubernetes, with the agents on hosts of their own.

A ChaosLab puts four node agents in network namespaces (consortium.netlab), each on its own
address, reaching the API server through a forwarder on the bridge; the operator runs in the root
namespace with the control plane. h0, h1 and h2 take Test Case v1's roles (N0 coordinator and
verifier, N1 worker, N2 the metal-labeled worker and verifier); h3 is a spare coordinator, so a
failure of a stage and then of its backup still leaves a node to take over.

Each trial runs one session and injects one fault into the node of a random stage at a random
token (the operator fault kills the operator instead):

    kill       SIGKILL the agent
    hang       SIGSTOP the agent (alive, socket open, never answers); SIGCONT after the trial
    partition  cut the host's link; healed after the trial, then the node must refuse the old epoch
    slow       a tbf rate limit on the host's link (both directions) for the rest of the session
    double     SIGKILL the agent, then SIGKILL the backup the operator chose for it
    operator   SIGKILL the operator and start a new one (the session resumes from its status)
    apiserver  SIGSTOP the API server for API_PAUSE_S, then SIGCONT: it hangs for everyone, operator
               and agents; asked for by name only (`--faults`), so that the default plan of a seed
               stays the one earlier runs were measured on

and records: completed, tokens identical to the single-node baseline, receipts complete (every
stage's positions covered by Receipt windows in the API), false fraud (Fraud verdicts plus
quarantined nodes: every node here is honest), and the recovery time from the trial's own data.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import statistics
import threading
import time
from pathlib import Path

from consortium import kube, netlab, receipt_check, testbed
from consortium import resources as r
from consortium.driver.state import audit_records, steps_of_report

FAULTS = ("kill", "hang", "partition", "slow", "double", "operator")   # the default plan's kinds
OPT_IN_FAULTS = ("apiserver",)
KNOWN_FAULTS = FAULTS + OPT_IN_FAULTS
CLUSTER_FAULTS = ("operator", "apiserver")   # no stage: they hit the control plane
API_PAUSE_S = 12.0   # longer than an agent's Lease lasts (10 s), which it cannot renew meanwhile
NAMESPACE = "chaos"
LAB_LABEL = f"{r.GROUP}/lab"
SLOW_KBIT = 384
RPC_TIMEOUT_S = 2.0     # the session's failover.rpcTimeoutSeconds: how long a silent stage is waited for

HOSTS = {
    "h0": testbed.NODE_LABELS["n0"],
    "h1": testbed.NODE_LABELS["n1"],
    "h2": testbed.NODE_LABELS["n2"],
    "h3": {r.LABEL_ACCELERATOR: "cuda", r.LABEL_COORDINATOR: "true", r.LABEL_VERIFIER: "true"},
}


@dataclasses.dataclass(frozen=True)
class Trial:
    index: int
    fault: str
    stage: int | None      # None for the faults of the control plane (CLUSTER_FAULTS)
    at_token: int


def plan(trials: int, max_tokens: int, seed: int, kinds: tuple[str, ...] = FAULTS) -> list[Trial]:
    """Random trials; every fault kind equally often (as far as `trials` allows), in random order,
    each at a random stage and token (from 2 to max_tokens - 4, so the fault lands mid-session)."""
    bad = [k for k in kinds if k not in KNOWN_FAULTS]
    if bad or not kinds:
        raise ValueError(f"unknown fault kind(s) {bad or '(none given)'}; known: {', '.join(KNOWN_FAULTS)}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if max_tokens < 8:
        raise ValueError(f"max_tokens must be >= 8 so a fault lands mid-session, got {max_tokens}")
    rng = random.Random(seed)
    order = [kinds[i % len(kinds)] for i in range(trials)]
    rng.shuffle(order)
    return [Trial(i, k, None if k in CLUSTER_FAULTS else rng.randrange(3), rng.randint(2, max_tokens - 4))
            for i, k in enumerate(order)]


def session_body(name: str, lab: str, max_tokens: int, backup_labels: dict[str, str] | None = None) -> dict:
    """Test Case v1's session, with every selector narrowed to this lab's hosts, any lab host (or
    those with `backup_labels`) as the backup, and a short RPC deadline so a silent stage is caught
    quickly."""
    body = testbed.sky_is_blue(max_tokens, name)
    spec = body["spec"]
    for st in spec["stages"]:
        st["nodeSelector"]["matchLabels"][LAB_LABEL] = lab
    spec["audit"]["verifierSelector"]["matchLabels"][LAB_LABEL] = lab
    spec["failover"]["backupSelector"] = {"matchLabels": {LAB_LABEL: lab, **(backup_labels or {})}}
    spec["failover"]["rpcTimeoutSeconds"] = RPC_TIMEOUT_S
    return body


class ChaosLab:
    """Four agents in network namespaces, registered and approved on the testbed's control plane."""

    def __init__(self, bed: testbed.Testbed):
        self.bed = bed
        self.lab = netlab.Lab(list(HOSTS))
        try:
            self.name = self.lab.tag.rstrip("-")
            host, port = bed.cluster.server.removeprefix("https://").rsplit(":", 1)
            self._api = self.lab.forward(host, int(port)).address
            self.kubeconfigs = {n: self._netns_kubeconfig(n) for n in HOSTS}
            for n in HOSTS:
                self.start(n)
            bed.approve(*HOSTS)
            bed.cluster.kubectl("create", "namespace", NAMESPACE, check=False)
        except BaseException:
            self.close()
            raise

    def _netns_kubeconfig(self, node: str) -> str:
        """The agent's own kubeconfig (a token bound to its Node) pointed at the forwarder that
        carries the API server into the namespaces."""
        kc = json.loads(Path(self.bed.agent_kubeconfig(node)).read_text())
        cl = kc["clusters"][0]["cluster"]
        # The serving certificate names localhost; the forwarder's address is not in it.
        cl["server"], cl["tls-server-name"] = f"https://{self._api[0]}:{self._api[1]}", "localhost"
        path = self.bed.workdir / f"agent-{node}-netns.kubeconfig"
        path.write_text(json.dumps(kc))
        os.chmod(path, 0o600)
        return str(path)

    def labels(self, node: str) -> dict[str, str]:
        return {**HOSTS[node], LAB_LABEL: self.name}

    def start(self, node: str) -> None:
        self.bed.start_agent(node, self.labels(node), host=self.lab.hosts[node],
                             kubeconfig=self.kubeconfigs[node])

    def pid(self, node: str) -> int:
        return self.bed.agents[node].pid

    def restore(self) -> None:
        """Every host healthy again: links restored, stopped agents continued, dead ones restarted,
        the operator running; then wait until every agent's Lease is fresh."""
        for n, h in self.lab.hosts.items():
            h.restore()
            p = self.bed.agents.get(n)
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
            elif p is not None:
                self.start(n)
        if self.bed.operator is None or self.bed.operator.poll() is not None:
            self.bed.start_operator()
        testbed.wait_until(self._leases_fresh, 60, "every lab agent's Lease renewed", every=0.5)

    def _leases_fresh(self) -> bool:
        from consortium import kube

        now = time.time()
        items = {x["metadata"]["name"]: x for x in self.bed.get("leases", namespace=testbed.NS)["items"]}
        for n in HOSTS:
            spec = (items.get(kube.lease_name(n)) or {}).get("spec") or {}
            if not spec.get("renewTime"):
                return False
            if now - kube.parse_time(spec["renewTime"]).timestamp() > 0.6 * spec.get("leaseDurationSeconds", 10):
                return False
        return True

    def close(self) -> None:
        """Stop the lab's agents, remove their ComputeNodes and Leases (so no later session is
        placed on them), and remove the namespaces and links."""
        for n in HOSTS:
            p = self.bed.agents.pop(n, None)
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.terminate()
                try:
                    p.wait(timeout=10)
                except Exception:  # noqa: BLE001 - it is killed instead
                    p.kill()
                    p.wait()
        try:
            self.bed.cluster.kubectl("delete", "computenode", *HOSTS, "--ignore-not-found", "--wait=false",
                                     check=False)
            from consortium import kube
            self.bed.cluster.kubectl("delete", "lease", "-n", testbed.NS, *[kube.lease_name(n) for n in HOSTS],
                                     "--ignore-not-found", check=False)
        finally:
            self.lab.close()


class PositionWatch:
    """Records when each new status.position of a session is seen (a watch, not polling): the
    operator fault's recovery is the gap from the kill to the next token."""

    def __init__(self, bed: testbed.Testbed, name: str, namespace: str):
        self.seen: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._args = (bed, name, namespace)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from kubernetes import client, config, watch

        bed, name, ns = self._args
        api = client.CustomObjectsApi(config.new_client_from_config(config_file=bed.cluster.kubeconfig))
        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(api.list_namespaced_custom_object, r.GROUP, r.VERSION, ns,
                                   r.InferenceSession.plural, field_selector=f"metadata.name={name}",
                                   timeout_seconds=5):
                    pos = (ev["object"].get("status") or {}).get("position") or 0
                    if not self.seen or pos != self.seen[-1][1]:
                        self.seen.append((time.monotonic(), pos))
                    if self._stop.is_set():
                        w.stop()
            except Exception:  # noqa: BLE001 - a dropped watch is restarted
                time.sleep(0.2)

    def first_after(self, t: float, position: int) -> float | None:
        return next((ts for ts, p in self.seen if ts > t and p > position), None)

    def stop(self) -> None:
        self._stop.set()


def latency_spike_ms(steps: list[list], from_position: int) -> float | None:
    """How much longer the slowest step from `from_position` on took than the median step before
    it: the failover's (or the slow link's) spike, from the driver's own step timings."""
    before = [ms for pos, _, ms, fo in steps[1:] if pos < from_position and not fo]
    after = [ms for pos, _, ms, _ in steps if pos >= from_position]
    if not before or not after:
        return None
    return round(max(after) - statistics.median(before), 1)


def run_trial(cl: ChaosLab, t: Trial, baseline: list[int], max_tokens: int, timeout_s: float = 600,
              backup_labels: dict[str, str] | None = None) -> dict:
    bed, ns = cl.bed, NAMESPACE
    t0 = time.monotonic()
    name = f"chaos-{t.index}-{t.fault}"
    cl.restore()
    bed.cluster.kubectl("delete", "inferencesession", name, "-n", ns, "--ignore-not-found", "--wait=true")
    watch = PositionWatch(bed, name, ns)
    out = {"trial": t.index, "fault": t.fault, "stage": t.stage, "at_token": t.at_token, "victim": None,
           "backup_killed": None, "completed": False, "identical": False, "receipts_complete": False,
           "false_fraud": None, "recovery_ms": None, "failovers": [], "backups_failed": [], "phase": None,
           "reason": None, "stale_write_refused": None, "moved_while_api_hung": None}
    try:
        bed.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(session_body(name, cl.name, max_tokens, backup_labels)))
        bed.wait_phase(name, ns, ("Running", "Completed", "Failed"), 300)
        marks = {"running": time.monotonic()}
        victim, old_epoch = None, None
        if t.stage is not None:   # read before the token is reached: the fault lands right after it
            sa = bed.wait_assignment(name, ns, t.stage, 60)
            victim, old_epoch = sa["nodeName"], int(sa["epoch"])
        out["victim"] = victim
        # Where the session is, asked of the node the fault hits (stage 0's for the control plane's).
        probe = victim or bed.wait_assignment(name, ns, 0, 60)["nodeName"]
        at = bed.wait_token(name, ns, probe, t.stage or 0, t.at_token, timeout_s)
        t_fault = marks["fault"] = time.monotonic()
        if t.fault == "operator":
            bed.kill_operator()
            bed.start_operator()
        elif t.fault == "apiserver":
            sid = bed.session_id(name, ns)   # read while the API answers
            drv = bed.session(name, ns)["status"]["report"]["driverState"]
            last = len(drv["prompt_tokens"]) + max_tokens - 2   # stage 0's last row (the last token is not fed)
            before, late = bed.stage_position(probe, sid, 0), []
            # Stage 0's position shortly before the server answers again: moved on, or the session
            # ended and was released (None), unless generation waited for the API.
            bed.cluster.pause_apiserver(API_PAUSE_S, while_paused=lambda: (
                time.sleep(API_PAUSE_S - 2), late.append(bed.stage_position(probe, sid, 0))))
            out["moved_while_api_hung"] = late[0] is None or (before is not None and late[0] > before)
            out["api_hung_positions"] = {"before": before, "late": late[0], "last": last}
            if before is not None and before >= last and late[0] is not None:
                # Every row was computed before the pause; the session's end (its last audits) may
                # wait for the API: this trial cannot tell whether generation would have.
                out["moved_while_api_hung"] = None
        else:
            _inject(cl, t.fault, victim)
            if t.fault == "double":
                try:
                    backup = testbed.wait_until(lambda: _moved(bed, name, ns, t.stage, victim), 120,
                                                f"a backup for stage {t.stage}", every=0.05)
                except TimeoutError as e:   # say where the session stood: the test's only trace
                    st = bed.session(name, ns).get("status") or {}
                    conds = {c["type"]: f"{c['status']} {c.get('reason')}: {c.get('message')}"
                             for c in st.get("conditions") or []}
                    raise TimeoutError(f"{e}; the session is {st.get('phase')} at token {st.get('position')}, "
                                       f"conditions {conds}; the operator's log ends: "
                                       f"{bed.operator_log()[-3000:]}") from None
                bed.kill_agent(backup)
                out["backup_killed"] = backup
        s = bed.wait_phase(name, ns, ("Completed", "Failed"), timeout_s)
        marks["finished"] = time.monotonic()
        st = s.get("status") or {}
        drv = (st.get("report") or {}).get("driverState") or {}
        tokens = st.get("tokens") or []
        ready = next((c for c in st.get("conditions") or [] if c["type"] == "Ready"), {})
        out["phase"], out["reason"] = st.get("phase"), f"{ready.get('reason')}: {ready.get('message')}"
        out["completed"] = st.get("phase") == "Completed"
        out["identical"] = tokens == baseline
        out["prefix_of_baseline"] = tokens == baseline[:len(tokens)]
        out["tokens"] = len(tokens)
        # Complete: every position fed lies in a Receipt that verifies under its node's published key.
        items = [it for it in bed.get("receipts", namespace=ns, selector=f"{r.GROUP}/session={name}")["items"]
                 if kube.owned_by(it, s["metadata"]["uid"])]   # not a deleted namesake's
        chk = receipt_check.check(s, items, bed.get("computenodes")["items"])
        P = chk["prompt_tokens"]
        out["receipts_complete"] = chk["receipts"] > 0 and chk["complete"] and not chk["failed"]
        out["receipt_gaps"], out["receipts_not_verifying"] = chk["gaps"], chk["failed"]
        audits = audit_records(drv)
        out["audits"] = len(audits)
        out["false_fraud"] = sum(a["verdict"] == "Fraud" for a in audits) + len(drv.get("quarantined") or [])
        out["mismatch"] = sum(a["verdict"] == "Mismatch" for a in audits)
        out["failovers"] = [{k: f[k] for k in ("stage", "from", "to", "epoch", "at_position", "at_token", "ms",
                                                      "replayed_rows")}
                            for f in drv.get("failovers") or []]
        out["backups_failed"] = [{k: f.get(k) for k in ("stage", "from", "to", "epoch", "at_position", "reason")}
                                 for f in drv.get("backups_failed") or []]
        if t.fault == "operator":
            nxt = watch.first_after(t_fault, at)
            out["recovery_ms"] = round((nxt - t_fault) * 1000, 1) if nxt else None
        else:
            steps = steps_of_report((st.get("report") or {}).get("steps"))
            out["recovery_ms"] = latency_spike_ms(steps, P + at - 1)
        if victim is not None and t.fault in ("hang", "partition"):
            # The node comes back (SIGCONT, link healed) with its old epoch: it must not write into
            # the session. Its own registrar fences it from the StageAssignment; ask it directly.
            cl.restore()
            out["stale_write_refused"] = stale_write_refused(bed.channel(victim), bed.session_id(name, ns), t.stage,
                                                         old_epoch)
        out["stale_receipts"] = _receipts_after_failover(items, out["failovers"])
        marks["checked"] = time.monotonic()
        # Seconds from the start of the trial (restore, apply) to each step of it.
        out["timeline_s"] = {k: round(v - t0, 1) for k, v in marks.items()}
    finally:
        watch.stop()
    # Deleted once measured: its StageAssignments go with it, and the agents free its slots.
    bed.cluster.kubectl("delete", "inferencesession", name, "-n", ns, "--ignore-not-found", "--wait=false",
                        check=False)
    return out


def _inject(cl: ChaosLab, fault: str, victim: str) -> None:
    if fault in ("kill", "double"):
        cl.bed.kill_agent(victim)
    elif fault == "hang":
        os.kill(cl.pid(victim), signal.SIGSTOP)
    elif fault == "partition":
        cl.lab.hosts[victim].cut()
    elif fault == "slow":
        cl.lab.hosts[victim].slow(SLOW_KBIT)
    else:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(KNOWN_FAULTS)}")


def _moved(bed: testbed.Testbed, name: str, ns: str, stage: int, victim: str) -> str | None:
    node = bed.get("stageassignment", f"{name}-s{stage}", ns)["spec"]["nodeName"]
    return node if node != victim else None


def stale_write_refused(ch, session: str, stage: int, old_epoch: int, timeout_s: float = 30) -> bool:
    """True once the agent behind gRPC channel `ch` (the operator's credentials) refuses a request
    of `session` (as agents know it: namespace/name) at its old epoch with FAILED_PRECONDITION (the
    fence); False if it accepted one or never said so in time. Closes the channel."""
    import grpc

    from consortium import wire
    from consortium.wire import pb

    stub = wire.pb_grpc.NodeAgentStub(ch)
    ref = pb.StageRef(session=session, stage=stage, epoch=old_epoch)

    def refused() -> bool:
        try:
            # A Truncate at the session's end changes nothing; what matters is whether it is refused.
            stub.Truncate(pb.TruncateRequest(ref=ref, position=10**6), timeout=5)
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.FAILED_PRECONDITION and "stale epoch" in (e.details() or "")
        return False

    try:   # polled until the agent's registrar has read the StageAssignment
        return testbed.wait_until(refused, timeout_s, "the stale epoch refused", every=0.5)
    except TimeoutError:
        return False
    finally:
        ch.close()


def _receipts_after_failover(items: list[dict], failovers: list[dict]) -> int:
    """Receipts signed by a failed-over node under its old epoch that reach past the failover
    position: a stale write into the session (must be 0)."""
    n = 0
    for f in failovers:
        for it in items:
            sp = it["spec"]
            if sp["stage"] == f["stage"] and sp["node"] == f["from"] and sp["epoch"] < f["epoch"]:
                end = sp["window"]["start"] + sp["window"]["count"]
                n += end > f.get("at_position", end)
    return n


def summary(trials: list[dict]) -> dict:
    ok = [t for t in trials if t["completed"] and t["identical"] and t["receipts_complete"] and t["false_fraud"] == 0
          and not t.get("stale_receipts") and t.get("stale_write_refused") is not False
          and t.get("moved_while_api_hung") is not False]
    rec = {}
    for k in KNOWN_FAULTS:
        xs = [t["recovery_ms"] for t in trials if t["fault"] == k and t["recovery_ms"] is not None]
        if xs:
            rec[k] = {"n": len(xs), "median_ms": round(statistics.median(xs), 1), "max_ms": round(max(xs), 1)}
    return {"trials": len(trials), "passed": len(ok),
            "completed": sum(t["completed"] for t in trials), "identical": sum(t["identical"] for t in trials),
            "receipts_complete": sum(t["receipts_complete"] for t in trials),
            "false_fraud": sum(t["false_fraud"] or 0 for t in trials),
            "stale_write_refused": sum(bool(t.get("stale_write_refused")) for t in trials),
            "by_fault": {k: sum(t["fault"] == k for t in trials) for k in KNOWN_FAULTS},
            "recovery_ms": rec}
