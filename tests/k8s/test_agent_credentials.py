"""A bare agent's kubeconfig token on a real API server: its expiry told in the ComputeNode, the
token revoked (its Node deleted) and refused, and a new kubeconfig written over the file taken up by
the running agent, which renews its Lease again without a restart."""
from __future__ import annotations

import base64
import datetime as dt
import json
import time

import pytest

from consortium import kube, testbed
from node_agent.credentials import Kubeconfig, jwt_expiry, token_expiry

from k8s_helpers import eventually, get_json

pytestmark = pytest.mark.k8s

NODE = "cred-a"


def _jwt(claims: dict) -> str:
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"eyJhbGciOiJSUzI1NiJ9.{body}.c2ln"


def test_the_expiry_is_read_from_the_current_contexts_token(tmp_path):
    exp = int(time.time()) + 3 * 3600
    cfg = {"current-context": "agent",
           "contexts": [{"name": "other", "context": {"user": "admin"}}, {"name": "agent", "context": {"user": "sa"}}],
           "users": [{"name": "admin", "user": {"token": _jwt({"exp": exp + 999})}},
                     {"name": "sa", "user": {"token": _jwt({"exp": exp})}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(cfg))
    assert token_expiry(path) == dt.datetime.fromtimestamp(exp, dt.timezone.utc)
    k = Kubeconfig(path, warn_before_s=24 * 3600)
    assert k.expiring() and "in 3.0 h" in k.describe()
    assert not Kubeconfig(path, warn_before_s=3600).expiring()
    assert "expired at" in k.describe(now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=4))
    # No expiry to tell: a token that is not a JWT, one without exp, a client certificate, no file.
    assert jwt_expiry("opaque-token") is None and jwt_expiry(_jwt({"sub": "x"})) is None
    cfg["users"][1]["user"] = {"client-certificate-data": "..."}
    path.write_text(json.dumps(cfg))
    assert token_expiry(path) is None and token_expiry(tmp_path / "missing") is None
    assert Kubeconfig(path).describe() == "its credentials name no expiry"


@pytest.fixture(scope="module")
def bed(cluster, tmp_path_factory):
    b = testbed.Testbed(cluster, tmp_path_factory.mktemp("credentials"))
    b.install()
    try:
        yield b
    finally:
        b.close()
        for kind in ("computenode", "node"):
            cluster.kubectl("delete", kind, NODE, "--ignore-not-found", check=False)


def _condition(cluster) -> dict:
    node = get_json(cluster, "computenode", NODE)
    return next(c for c in node["status"]["conditions"] if c["type"] == "CredentialsExpiring")


def _renewed(cluster) -> dt.datetime:
    lease = get_json(cluster, "lease", "-n", testbed.NS, kube.lease_name(NODE))
    return dt.datetime.fromisoformat(lease["spec"]["renewTime"].replace("Z", "+00:00"))


def test_a_running_agent_tells_its_tokens_expiry_and_takes_up_a_new_kubeconfig(bed):
    cluster = bed.cluster
    path = bed.workdir / f"agent-{NODE}.kubeconfig"
    cluster.write_kubeconfig(path, token=cluster.node_bound_token(testbed.AGENT_SA, testbed.NS, NODE, duration="2h"))
    bed.start_agent(NODE, {"consortium.io/accelerator": "metal"}, kubeconfig=str(path),
                    extra=["--credentials-warn-hours", "3", "--lease-seconds", "5", "--memory", "3GiB"])
    # What it offers its stages, as declared (not the machine's memory): placement goes by it.
    assert bed.get("computenodes", NODE)["spec"]["memoryBytes"] == 3 << 30
    c = _condition(cluster)
    assert c["status"] == "True" and c["reason"] == "TokenExpiring", c
    assert "its token expires at" in c["message"] and str(path) in c["message"]

    # Revoked: the Node its token is bound to is deleted (a Node needs no kubelet here). The API
    # server refuses the token, the Lease is no longer renewed, and the agent says why.
    cluster.kubectl("delete", "node", NODE)
    log = bed.workdir / f"agent-{NODE}.log"
    eventually(lambda: _refused_in(log), timeout=60)
    stalled = _renewed(cluster)
    time.sleep(3)
    assert _renewed(cluster) == stalled

    # A new kubeconfig over the same file, with a token good for two days: taken up, the Lease is
    # renewed again and the condition says the token is valid, with no restart.
    cluster.write_kubeconfig(path, token=cluster.node_bound_token(testbed.AGENT_SA, testbed.NS, NODE, duration="48h"))

    def valid_again():
        c = _condition(cluster)
        assert c["status"] == "False" and c["reason"] == "TokenValid", c
        assert _renewed(cluster) > stalled
    eventually(valid_again, timeout=60)
    assert bed.agents[NODE].poll() is None
    assert "changed: loaded again" in log.read_text()


def _refused_in(log) -> None:
    assert "the API server refuses the agent's token: it was revoked" in log.read_text()
