"""The CRDs on a real API server: examples apply, defaults are filled in, `kubectl get` prints the
intended columns, bad manifests are refused with their message, and a Receipt's spec never changes."""
from __future__ import annotations

import json

import pytest
import yaml

from consortium import resources as r

from k8s_helpers import ROOT, apply, ensure_namespace, get_json, headers, install_crds

pytestmark = pytest.mark.k8s

NS = "crd-examples"
CASES = yaml.safe_load((ROOT / "tests/k8s/invalid/cases.yaml").read_text())
HEX = "ab" * 32


@pytest.fixture(scope="module")
def api(cluster):
    install_crds(cluster)
    ensure_namespace(cluster, NS)
    return cluster


def example_files():
    return [p for p in sorted((ROOT / "manifests").rglob("*.yaml"))
            if any(doc and "apiVersion" in doc and doc.get("kind") != "Cluster"
                   for doc in yaml.safe_load_all(p.read_text()))]


@pytest.mark.parametrize("path", example_files(), ids=lambda p: str(p.relative_to(ROOT / "manifests")))
def test_example_manifest_applies(api, path):
    done = api.kubectl("apply", "-n", NS, "-f", str(path))
    assert "created" in done.stdout or "configured" in done.stdout or "unchanged" in done.stdout


def test_server_fills_in_defaults(api):
    api.kubectl("apply", "-n", NS, "-f", str(ROOT / "manifests/sessions/minimal.yaml"))
    spec = get_json(api, "inferencesession", "minimal", "-n", NS)["spec"]
    # Objects left out are defaulted to {} and then to their fields' defaults.
    assert spec["maxTokens"] == 64 and spec["receiptWindow"] == 16 and spec["signing"] == "PerStep"
    assert spec["audit"]["probability"] == 0.2
    assert spec["sampling"]["temperature"] == 0
    assert spec["canonicalGrid"] == {"dtype": "float16", "grid": 64, "clamp": 100}
    # And the model reads back what the server stored.
    r.InferenceSession.model_validate(get_json(api, "inferencesession", "minimal", "-n", NS))


def test_computenode_is_cluster_scoped_and_unapproved_by_default(api):
    api.kubectl("apply", "-f", str(ROOT / "manifests/nodes/computenode-macbook.yaml"))
    node = get_json(api, "computenode", "macbook")
    assert "namespace" not in node["metadata"] and node["spec"]["approved"] is False


def _assignment() -> dict:
    spec = r.StageAssignmentSpec(session="sky-is-blue", stage_index=1, layers=r.LayerRange.parse("10-19"),
                                 node_name="macbook", epoch=2)
    return r.StageAssignment(metadata={"name": r.StageAssignment.name_for("sky-is-blue", 1)}, spec=spec).to_k8s()


def _receipt(name: str, count: int = 3) -> dict:
    spec = r.ReceiptSpec(session="sky-is-blue", stage=1, node="macbook", epoch=2,
                         window=r.Window(start=16, count=count), commitments=[HEX] * count,
                         merkle_root=HEX, input_digest=HEX, grid=r.CanonicalGrid(),
                         signature="c2lnbmF0dXJl", public_key_fingerprint=HEX)
    return r.Receipt(metadata={"name": name}, spec=spec).to_k8s()


def _patch_status(api, kind: str, name: str, status: dict, namespace: str | None = None):
    args = ["patch", kind, name, "--subresource=status", "--type=merge", "-p", json.dumps({"status": status})]
    return api.kubectl(*args, *(["-n", namespace] if namespace else []))


def _condition(type_: str, status: str) -> dict:
    return {"type": type_, "status": status, "reason": "Test", "message": "",
            "lastTransitionTime": "2025-01-01T00:00:00Z"}


def _row(api, *args) -> dict[str, str]:
    lines = api.kubectl("get", *args).stdout.splitlines()
    return dict(zip(lines[0].split(), lines[1].split()))


def test_session_columns(api):
    api.kubectl("apply", "-n", NS, "-f", str(ROOT / "manifests/sessions/sky-is-blue.yaml"))
    _patch_status(api, "inferencesession", "sky-is-blue",
                  {"phase": "Running", "position": 20, "stagesReady": "3/3", "stageEpochs": [0, 1, 0],
                   "conditions": [_condition("Ready", "True")]}, NS)
    assert headers(api, "inferencesessions", "-n", NS) == ["NAME", "MODEL", "PHASE", "TOKENS", "MAX", "STAGES", "AGE"]
    row = _row(api, "isess", "sky-is-blue", "-n", NS)
    assert (row["MODEL"], row["PHASE"], row["TOKENS"], row["MAX"], row["STAGES"]) == \
        ("SmolLM2-135M-Instruct", "Running", "20", "64", "3/3")
    _patch_status(api, "inferencesession", "sky-is-blue",
                  {"phase": "Completed", "report": {"stopped": "stop_sequence"}, "metrics": {"tokensPerSecond": 41.5},
                   "layers": ["0-9", "10-19", "20-29"]}, NS)
    wide = api.kubectl("get", "isess", "sky-is-blue", "-n", NS, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-3:] == ["STOPPED", "TOKENS/S", "LAYERS"]
    assert wide[1].split()[-3:] == ["stop_sequence", "41.5", '["0-9","10-19","20-29"]']


def test_stage_assignment_columns(api):
    apply(api, _assignment(), NS)
    _patch_status(api, "stageassignment", "sky-is-blue-s1",
                  {"observedEpoch": 2, "conditions": [_condition("Bound", "True"), _condition("Ready", "True")]}, NS)
    assert headers(api, "stageassignments", "-n", NS) == \
        ["NAME", "SESSION", "STAGE", "LAYERS", "NODE", "EPOCH", "READY", "AGE"]
    row = _row(api, "stasg", "sky-is-blue-s1", "-n", NS)
    assert (row["SESSION"], row["STAGE"], row["LAYERS"], row["NODE"], row["EPOCH"], row["READY"]) == \
        ("sky-is-blue", "1", "10-19", "macbook", "2", "True")


def test_receipt_columns(api):
    apply(api, _receipt("sky-is-blue-s1-w16"), NS)
    _patch_status(api, "receipt", "sky-is-blue-s1-w16", {"verdict": "Passed", "verifier": "n0"}, NS)
    assert headers(api, "receipts", "-n", NS) == ["NAME", "SESSION", "STAGE", "NODE", "TOKENS", "VERDICT", "AGE"]
    row = _row(api, "receipts", "sky-is-blue-s1-w16", "-n", NS)
    assert (row["SESSION"], row["STAGE"], row["NODE"], row["TOKENS"], row["VERDICT"]) == \
        ("sky-is-blue", "1", "macbook", "3", "Passed")
    wide = _row(api, "receipts", "sky-is-blue-s1-w16", "-n", NS, "-o", "wide")
    assert (wide["START"], wide["EPOCH"], wide["ROLLBACKS"]) == ("16", "2", "0"), wide


def test_computenode_columns(api):
    api.kubectl("apply", "-f", str(ROOT / "manifests/nodes/computenode-macbook.yaml"))
    _patch_status(api, "computenode", "macbook",
                  {"backend": "cpu", "llamaCpp": {"version": "0.3.36"},
                   "conditions": [_condition("Ready", "True"), _condition("Quarantined", "False")]})
    assert headers(api, "computenodes") == \
        ["NAME", "BACKEND", "ACCELERATOR", "APPROVED", "READY", "QUARANTINED", "AGE"]
    row = _row(api, "cnode", "macbook")
    # Detected backend beside the admin's label: a CPU machine labeled metal shows both.
    assert (row["BACKEND"], row["ACCELERATOR"], row["APPROVED"], row["READY"], row["QUARANTINED"]) == \
        ("cpu", "metal", "false", "True", "False")


def test_all_kinds_in_one_category(api):
    out = api.kubectl("get", "consortium", "-A").stdout
    for kind in ("inferencesession", "stageassignment", "receipt", "computenode"):
        assert f"{kind}.consortium.io/" in out


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_invalid_manifest_is_refused_with_its_message(api, case):
    done = apply(api, case["manifest"], NS, check=False)
    assert done.returncode != 0, f"accepted: {done.stdout}"
    assert case["expect"] in done.stderr, done.stderr
    name = case["manifest"]["metadata"]["name"]
    kind = case["manifest"]["kind"].lower()
    assert api.kubectl("get", kind, name, "-n", NS, check=False).returncode != 0


def test_receipt_spec_is_immutable(api):
    apply(api, _receipt("immutable"), NS)
    for patch in ({"spec": {"node": "someone-else"}}, {"spec": {"commitments": ["cd" * 32] * 3}}):
        done = api.kubectl("patch", "receipt", "immutable", "-n", NS, "--type=merge", "-p", json.dumps(patch),
                           check=False)
        assert done.returncode != 0 and "Receipt spec is immutable once written" in done.stderr, done.stderr
    # Replacing the whole object is refused the same way.
    changed = _receipt("immutable")
    changed["spec"]["epoch"] = 3
    done = api.kubectl("replace", "-n", NS, "-f", "-", input=json.dumps(changed), check=False)
    assert done.returncode != 0 and "Receipt spec is immutable once written" in done.stderr
    # Audits write the status, and labels stay editable.
    _patch_status(api, "receipt", "immutable",
                  {"verdict": "PassedWithinTolerance",
                   "audits": [{"position": 17, "verdict": "PassedWithinTolerance", "figures": {"relL2": 0.003}}]}, NS)
    api.kubectl("label", "receipt", "immutable", "-n", NS, "audited=yes")
    receipt = get_json(api, "receipt", "immutable", "-n", NS)
    assert receipt["spec"]["node"] == "macbook" and receipt["status"]["verdict"] == "PassedWithinTolerance"
    assert r.Receipt.model_validate(receipt).status.audits[0].figures == {"relL2": 0.003}


def test_session_spec_is_immutable(api):
    """A changed spec would not reach a running session (or would meet its saved state on a resume):
    refused, with what to do instead. Its status and labels stay writable."""
    session = yaml.safe_load((ROOT / "manifests/sessions/minimal.yaml").read_text())
    session["metadata"]["name"] = "fixed-spec"
    apply(api, session, NS)
    for patch in ({"spec": {"maxTokens": 8}}, {"spec": {"prompt": "another prompt"}},
                  {"spec": {"audit": {"probability": 0.5}}}):
        done = api.kubectl("patch", "inferencesession", "fixed-spec", "-n", NS, "--type=merge", "-p",
                           json.dumps(patch), check=False)
        assert done.returncode != 0 and "InferenceSession spec is immutable" in done.stderr, (patch, done.stderr)
    # The same manifest applied again changes nothing, and is taken.
    apply(api, session, NS)
    _patch_status(api, "inferencesession", "fixed-spec", {"phase": "Running", "position": 3}, NS)
    api.kubectl("label", "inferencesession", "fixed-spec", "-n", NS, "team=a")
    got = get_json(api, "inferencesession", "fixed-spec", "-n", NS)
    assert got["status"]["position"] == 3 and got["metadata"]["labels"]["team"] == "a"
    assert got["spec"]["maxTokens"] == session["spec"].get("maxTokens", 64)


def test_status_is_a_subresource(api):
    # A status sent with the main resource is dropped: only the status subresource writes it.
    obj = _receipt("status-ignored")
    obj["status"] = {"verdict": "Fraud"}
    apply(api, obj, NS)
    assert get_json(api, "receipt", "status-ignored", "-n", NS).get("status", {}).get("verdict") is None


@pytest.mark.parametrize("patch_file, expected", [
    ("n0-coordinator.patch.yaml", {r.LABEL_ACCELERATOR: "cuda", r.LABEL_COORDINATOR: "true", r.LABEL_VERIFIER: "true"}),
    ("n1-worker.patch.yaml", {r.LABEL_ACCELERATOR: "cuda", r.LABEL_WORKER: "true"}),
])
def test_node_label_patches_label_a_node(api, patch_file, expected):
    # No kubelet runs here, so the Node object is made by hand, as a k3s agent would register it.
    name = patch_file.split(".")[0]
    apply(api, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
    api.kubectl("patch", "node", name, "--type", "merge", "--patch-file", str(ROOT / "manifests/nodes" / patch_file))
    labels = get_json(api, "node", name)["metadata"]["labels"]
    assert {k: v for k, v in labels.items() if k.startswith("consortium.io/")} == expected
    api.kubectl("delete", "node", name)
