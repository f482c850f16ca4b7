"""`consortium nodes` on a real API server: the table an admin judges nodes by, and approving,
quarantining and releasing a node as conditions and Events the operator and placement read."""
from __future__ import annotations

import json

import pytest

from consortium import kube
from consortium import resources as r

from k8s_helpers import ensure_namespace, get_json, install_crds, register_nodes, run_cli

pytestmark = pytest.mark.k8s

NODES = ("judge-a", "judge-b")
NS = "nodes-command"


@pytest.fixture(scope="module")
def nodes(cluster):
    install_crds(cluster)
    ensure_namespace(cluster, NS)
    register_nodes(cluster, NODES)
    yield cluster
    cluster.kubectl("delete", "computenode", *NODES, "--ignore-not-found")


def nodes_cli(cluster, tmp_path, *args):
    return run_cli("nodes", *args, "--kubeconfig", cluster.kubeconfig, cwd=tmp_path)


def test_approve_quarantine_and_release_as_the_operator_and_placement_read_them(nodes, tmp_path):
    cluster = nodes
    cluster.kubectl("patch", "computenode", "judge-b", "--type=merge", "-p", json.dumps({"spec": {"memoryBytes": 12 << 30}}))
    cluster.kubectl("patch", "computenode", "judge-b", "--subresource=status", "--type=merge", "-p", json.dumps(
        {"status": {"backend": "cuda", "auditRecord": {"audits": 12, "mismatches": 1, "frauds": 0},
                    "verifierRecord": {"verdicts": 30, "overruled": 2}}}))
    approved = nodes_cli(cluster, tmp_path, "approve", *NODES)
    assert approved.returncode == 0 and approved.stdout.count("approved") == 2, approved.stderr
    assert all(get_json(cluster, "computenode", n)["spec"]["approved"] for n in NODES)

    refused = nodes_cli(cluster, tmp_path, "quarantine", "judge-b")
    assert refused.returncode == 2 and "--reason" in refused.stderr
    done = nodes_cli(cluster, tmp_path, "quarantine", "judge-b", "--reason", "answers drift since the driver update")
    assert done.returncode == 0, done.stderr
    cn = get_json(cluster, "computenode", "judge-b")
    q = kube.condition(cn["status"]["conditions"], "Quarantined")
    assert (q["status"], q["reason"], q["message"]) == ("True", "QuarantinedByAdmin", "answers drift since the driver update")
    assert cn["status"]["auditRecord"]["audits"] == 12   # its history stays

    listed = json.loads(nodes_cli(cluster, tmp_path, "--json").stdout)
    mine = {x["name"]: x for x in listed if x["name"] in NODES}
    assert mine["judge-b"]["quarantined"] and not mine["judge-a"]["quarantined"]
    assert (mine["judge-b"]["audits"], mine["judge-b"]["mismatches"], mine["judge-b"]["overruled"]) == (12, 1, 2)
    table = nodes_cli(cluster, tmp_path).stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "BACKEND", "ACCEL"]
    row = next(line.split() for line in table.splitlines() if line.startswith("judge-b"))
    assert row[1:7] == ["cuda", "-", "yes", "no", "yes", "12.0Gi"] and "12/1/0" in row and "30/2" in row
    assert mine["judge-b"]["memoryBytes"] == 12 << 30 and mine["judge-a"]["memoryBytes"] == 0
    assert "judge-b is quarantined: answers drift since the driver update" in table

    released = nodes_cli(cluster, tmp_path, "release", "judge-b", "--reason", "driver rolled back")
    assert released.returncode == 0, released.stderr
    q = kube.condition(get_json(cluster, "computenode", "judge-b")["status"]["conditions"], "Quarantined")
    assert (q["status"], q["reason"]) == ("False", "ReleasedByAdmin")
    events = get_json(cluster, "events", "-n", "default")["items"]
    said = [(e["reason"], e["message"]) for e in events if e["involvedObject"].get("name") == "judge-b"]
    assert ("NodeQuarantined", "judge-b: quarantined by an admin: answers drift since the driver update") in said
    assert ("NodeReleased", "judge-b: released by an admin: driver rolled back") in said

    missing = nodes_cli(cluster, tmp_path, "release", "no-such-node", "--reason", "x")
    assert missing.returncode == 2 and "404" in missing.stderr


def test_a_node_counts_the_stages_it_holds_in_running_sessions_only(nodes, tmp_path):
    cluster = nodes
    for name, ended in (("still-running", False), ("long-done", True)):
        cluster.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(
            {"apiVersion": r.API_VERSION, "kind": "InferenceSession", "metadata": {"name": name},
             "spec": {"model": {"name": "m", "file": "m.gguf"}, "prompt": "p", "stages": [{"layers": "0-29"}]}}))
        if ended:
            cluster.kubectl("patch", "inferencesession", name, "-n", NS, "--subresource=status", "--type=merge",
                            "-p", json.dumps({"status": {"phase": "Completed"}}))
        cluster.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(
            {"apiVersion": r.API_VERSION, "kind": "StageAssignment", "metadata": {"name": f"{name}-s0"},
             "spec": {"session": name, "stageIndex": 0, "layers": {"start": 0, "end": 29}, "nodeName": "judge-a",
                      "epoch": 1, "role": "worker", "model": {"name": "m", "file": "m.gguf"}}}))
    listed = {x["name"]: x for x in json.loads(nodes_cli(cluster, tmp_path, "--json", *NODES).stdout)}
    assert listed["judge-a"]["stages"] == 1 and listed["judge-b"]["stages"] == 0
    assert set(listed) == set(NODES)
