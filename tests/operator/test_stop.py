"""`consortium stop` through the operator: a session asked to stop completes with the tokens it has
(the single node's, every position signed and covered), and one asked before it was placed fails
saying so."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from consortium import kubecase, receipt_check, testbed
from consortium import resources as r

pytestmark = pytest.mark.k8s

NS = "tc-stop"
# A prompt this model answers at length (500 tokens without an end of generation on a single node):
# the stop, not the model, must end the session.
LONG_PROMPT = "Write the numbers from 1 to 300 in words, separated by commas."
MAX = 500


def stop(bed, tmp_path, name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "consortium.cli", "stop", name, "-n", NS,
                           "--kubeconfig", bed.cluster.kubeconfig, *args],
                          capture_output=True, text=True, timeout=200, cwd=tmp_path)


@pytest.fixture(scope="module")
def ns(bed):
    bed.cluster.kubectl("create", "namespace", NS)
    return NS


def test_a_session_stopped_on_request_completes_with_the_tokens_it_has(bed, ns, tmp_path):
    body = testbed.sky_is_blue(MAX, "counting")
    body["spec"]["prompt"] = LONG_PROMPT
    bed.cluster.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(body))
    deadline = time.monotonic() + 300
    while ((bed.session("counting", NS).get("status") or {}).get("position") or 0) < 5:
        assert time.monotonic() < deadline, "the session never reached 5 tokens"
        time.sleep(0.2)

    done = stop(bed, tmp_path, "counting", "--reason", "enough counting", "--wait")
    assert done.returncode == 0, done.stderr
    assert "stop requested" in done.stderr and "Completed: stopped on request: enough counting" in done.stderr

    s = bed.session("counting", NS)
    st = s["status"]
    tokens = st["tokens"]
    assert st["phase"] == "Completed" and st["report"]["stopped"] == "stop_requested"
    assert st["report"]["stopReason"] == "enough counting"
    assert 5 <= len(tokens) < MAX
    assert tokens == kubecase.baseline(len(tokens), LONG_PROMPT, threads=1).tokens   # the single node's
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["message"] == f"{len(tokens)} tokens (stop_requested: enough counting)"
    assert any(e["reason"] == "Stopped" and "enough counting" in e["message"] for e in bed.events(NS, "counting"))
    # Its evidence is whole: every position fed to every stage is in a Receipt that verifies.
    receipts = bed.get("receipts", namespace=NS, selector=f"{r.GROUP}/session=counting")["items"]
    checked = receipt_check.check(s, receipts, bed.get("computenodes")["items"])
    assert checked["ok"] and checked["complete"], receipt_check.lines(checked)

    again = stop(bed, tmp_path, "counting")
    assert again.returncode == 0 and "already Completed" in again.stderr
    missing = stop(bed, tmp_path, "no-such-session")
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_a_session_stopped_before_it_is_placed_fails_saying_so(bed, ns, tmp_path):
    body = testbed.sky_is_blue(8, "never-placed")
    body["spec"]["stages"][0]["nodeSelector"] = {"matchLabels": {"consortium.io/accelerator": "tpu"}}
    bed.cluster.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(body))
    bed.wait_phase("never-placed", NS, ("Scheduling",), 120)

    done = stop(bed, tmp_path, "never-placed", "--reason", "no TPU today", "--wait", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    st = bed.session("never-placed", NS)["status"]
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert st["phase"] == "Failed" and ready["reason"] == "StopRequested"
    assert ready["message"] == "stopped before it was placed: no TPU today"
    assert not [a for a in bed.get("stageassignments", namespace=NS)["items"] if a["spec"]["session"] == "never-placed"]
