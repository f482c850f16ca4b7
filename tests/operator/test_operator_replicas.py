"""Two operator replicas through the chart's RBAC on a real API server (`--leader-elect`): one leads
(the Lease names it), the other waits; the leader SIGKILLed mid-session, the standby takes the Lease
and resumes the session, which ends with the single node's tokens; a leader cut off from the API
server exits before its Lease could pass on."""
from __future__ import annotations

import json
import time

import pytest

from consortium import kubecase, testbed

pytestmark = pytest.mark.k8s

NS = "tc-replicas"
PROMPT = "Write the numbers from 1 to 300 in words, separated by commas."   # long: no early end
TOKENS = 160
ELECT = ["--leader-elect", "--leader-lease-seconds", "6", "--leader-renew-seconds", "4"]


def holder(bed) -> str | None:
    lease = json.loads(bed.cluster.kubectl("get", "lease", "consortium-operator-leader", "-n", testbed.NS,
                                           "-o", "json").stdout)
    return (lease.get("spec") or {}).get("holderIdentity")


def until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return got


def test_a_standby_replica_takes_over_when_the_leader_dies(bed):
    bed.cluster.kubectl("create", "namespace", NS)
    want = kubecase.baseline(TOKENS, PROMPT, threads=1).tokens
    bed.kill_operator()   # the bed's single operator: these two replace it for this test
    a = b = None
    try:
        a = bed.start_operator(ELECT)
        until(lambda: (holder(bed) or "").endswith(f"_{a.pid}"), 60, "the first replica never led")
        b = bed.start_operator(ELECT)
        body = testbed.sky_is_blue(TOKENS, "replicated")
        body["spec"]["prompt"] = PROMPT
        bed.cluster.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(body))
        until(lambda: ((bed.session("replicated", NS).get("status") or {}).get("position") or 0) >= 8, 120,
              "the session never reached token 8")
        assert (holder(bed) or "").endswith(f"_{a.pid}")   # the standby waited
        a.kill()
        a.wait()
        killed = time.monotonic()
        s = bed.wait_phase("replicated", NS, ("Completed",), 300)
        assert (holder(bed) or "").endswith(f"_{b.pid}")
        assert s["status"]["tokens"] == want
        assert "Resumed" in [e["reason"] for e in bed.events(NS, "replicated")]
        assert time.monotonic() - killed < 120

        # A leader that cannot renew its Lease (the API server hangs) exits within the renew time,
        # before its Lease could pass to another replica: two never drive at once.
        bed.cluster.pause_apiserver(7, while_paused=lambda: b.wait(6.5))
        assert b.returncode == 3
        assert "was not renewed for 4 s; exiting" in bed.operator_log()   # b's: the last one started
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        bed.start_operator()   # a single operator again for the tests after this one
