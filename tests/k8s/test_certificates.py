"""Agent certificates issued by the operator (the chart's tls.issuer operator) on a real API server:
real agent and operator processes, each with its ServiceAccount's token, agents asking through
CertificateSigningRequests, the operator signing or denying them."""
from __future__ import annotations

import base64
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from consortium import testbed, tls, wire
from consortium.wire import pb
from consortium_operator import certificates

from k8s_helpers import ensure_namespace, eventually, get_json

pytestmark = pytest.mark.k8s

NS = testbed.NS
AGENT_USER = f"system:serviceaccount:{NS}:{testbed.AGENT_SA}"
NODES = ("cert-a", "cert-b", "cert-c", "cert-d")   # agents started here: their Nodes and ComputeNodes go at the end
OPERATOR_ARGS = ["--namespace", "certificates-no-sessions"]


@pytest.fixture(scope="module")
def issuing(cluster, tmp_path_factory):
    bed = testbed.Testbed(cluster, tmp_path_factory.mktemp("issuing"), issuer="operator")
    bed.install()
    # Watching one empty namespace: the sessions other tests leave are none of this operator's business.
    # (It must exist: kopf starts no watch at all, not even of cluster-wide kinds, before one does.)
    ensure_namespace(cluster, OPERATOR_ARGS[1])
    bed.start_operator(OPERATOR_ARGS)
    try:
        yield bed
    finally:
        bed.close()
        for kind in ("computenode", "node"):
            cluster.kubectl("delete", kind, *NODES, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "csr", "--all", check=False)


def _requests(cluster, node: str) -> list[dict]:
    return [c for c in get_json(cluster, "csr")["items"]
            if c["spec"]["signerName"] == tls.AGENT_SIGNER and c["metadata"]["name"].startswith(f"consortium-agent-{node}-")]


def _health(bed, node: str) -> pb.HealthResponse:
    with bed.channel(node) as ch:
        return wire.pb_grpc.NodeAgentStub(ch).Health(pb.HealthRequest(), timeout=10)


def test_an_agent_serves_with_the_certificate_the_operator_signed_for_its_node(issuing):
    bed = issuing
    bed.start_agent("cert-a", {})
    assert _health(bed, "cert-a").node_id == "cert-a"   # the driver's handshake expects the name "cert-a"
    [csr] = _requests(bed.cluster, "cert-a")
    assert csr["spec"]["username"] == AGENT_USER
    approved = [c for c in csr["status"]["conditions"] if c["type"] == "Approved"]
    assert approved and approved[0]["reason"] == "AgentOfThisNode"
    leaf, ca = x509.load_pem_x509_certificates(base64.b64decode(csr["status"]["certificate"]))
    assert ca.subject == bed.ca.cert.subject
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["cert-a"]
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    # The agent's key never left its folder: the certificate holds the key written there.
    kept = bed.workdir / "tls" / "cert-a"
    assert (kept / "tls.key").stat().st_mode & 0o777 == 0o600
    assert x509.load_pem_x509_certificate((kept / "tls.crt").read_bytes()) == leaf

    # Started again, it serves with the certificate it kept: no second request.
    bed.kill_agent("cert-a")
    bed.start_agent("cert-a", {})
    assert _health(bed, "cert-a").node_id == "cert-a"
    assert len(_requests(bed.cluster, "cert-a")) == 1
    assert "kept from an earlier start" in (bed.workdir / "agent-cert-a.log").read_text()


def test_a_request_made_while_the_operator_was_down_is_signed_when_it_starts(issuing):
    bed = issuing
    bed.kill_operator()
    bed.start_agent("cert-c", {}, wait=False)

    def asked():
        found = _requests(bed.cluster, "cert-c")
        assert len(found) == 1, found
        return found[0]
    csr = eventually(asked, timeout=60)
    assert not (csr.get("status") or {}).get("certificate")
    bed.start_operator(OPERATOR_ARGS)
    bed.wait_agent("cert-c")
    assert _health(bed, "cert-c").node_id == "cert-c"


def test_a_running_agent_renews_its_certificate_and_new_connections_get_the_new_one(issuing, tmp_path):
    """What node-agent's Renewer does when a third of the certificate's life is left, done now: the
    same key asks again, the operator signs again, and the agent (in this process, with the agent's
    node-bound token) presents the new certificate to the next connection."""
    import socket

    from cryptography.hazmat.primitives import serialization

    from consortium import kube
    from node_agent import certificate, server
    from node_agent.identity import NodeIdentity

    bed, cluster = issuing, issuing.cluster
    kube.load_config(cluster.write_kubeconfig(tmp_path / "agent.kubeconfig", token=cluster.node_bound_token(
        testbed.AGENT_SA, NS, "cert-d")))
    try:
        rotating = tls.Rotating(certificate.from_cluster(tmp_path / "tls", "cert-d"))
        srv, service, port = server.serve(NodeIdentity.load_or_create(tmp_path / "node.pem", "cert-d"), "127.0.0.1:0",
                                          server.AgentConfig(node_id="cert-d", threads=1, n_ctx=64), tls=rotating)
    finally:
        kube.load_config(cluster.kubeconfig)

    def served() -> bytes:
        ctx = bed.driver_tls.ssl_context(server=False, peer_name="cert-d")
        with socket.create_connection(("127.0.0.1", service.data_port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="cert-d") as conn:
                return conn.getpeercert(binary_form=True)
    try:
        first = served()
        kube.load_config(str(tmp_path / "agent.kubeconfig"))
        try:
            certificate.Renewer(rotating, tmp_path / "tls", "cert-d").renew()
        finally:
            kube.load_config(cluster.kubeconfig)
        new = x509.load_pem_x509_certificate(rotating.current.cert_pem)
        assert served() == new.public_bytes(serialization.Encoding.DER) != first
        assert len(_requests(cluster, "cert-d")) == 2
        with tls.secure_channel(f"127.0.0.1:{port}", "cert-d", bed.driver_tls) as ch:
            assert wire.pb_grpc.NodeAgentStub(ch).Health(pb.HealthRequest(), timeout=10).node_id == "cert-d"
        assert (tmp_path / "tls" / "tls.crt").read_bytes() == rotating.current.cert_pem   # kept for the next start
    finally:
        srv.stop(None)


def _ask(cluster, name: str, *, token: str | None, node: str, usages=("digital signature", "server auth")):
    key = ec.generate_private_key(ec.SECP256R1())
    cluster.kubectl("create", "-f", "-", token=token, input=json.dumps({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest", "metadata": {"name": name},
        "spec": {"request": base64.b64encode(tls.signing_request(node, key)).decode(), "signerName": tls.AGENT_SIGNER,
                 "usages": list(usages)}}))


@pytest.mark.parametrize("name, who, node, usages, reason", [
    ("another-nodes-name", "agent:cert-b", "cert-a", None, "not CN=cert-b"),
    ("token-bound-to-no-node", "agent", "cert-a", None, "bound to no node"),
    ("not-an-agent", "admin", "cert-a", None, "not the agents' ServiceAccount"),
    ("client-usage", "agent:cert-b", "cert-b", ("digital signature", "server auth", "client auth"), "server auth only"),
])
def test_requests_the_operator_denies_with_the_reason(issuing, name, who, node, usages, reason):
    bed, cluster = issuing, issuing.cluster
    token = None if who == "admin" else (
        cluster.create_token(testbed.AGENT_SA, NS) if who == "agent" else
        cluster.node_bound_token(testbed.AGENT_SA, NS, who.split(":", 1)[1]))
    _ask(cluster, name, token=token, node=node, **({"usages": usages} if usages else {}))

    def denied():
        got = get_json(cluster, "csr", name)
        [c] = [c for c in (got.get("status") or {}).get("conditions") or [] if c["type"] == "Denied"]
        return got, c
    got, cond = eventually(denied, timeout=60)
    assert cond["reason"] == "NotThisNodesAgent" and reason in cond["message"], cond
    assert not got["status"].get("certificate")


def test_an_agent_refused_a_certificate_exits_with_the_reason(issuing):
    bed, cluster = issuing, issuing.cluster
    unbound = cluster.write_kubeconfig(bed.workdir / "unbound.kubeconfig", token=cluster.create_token(testbed.AGENT_SA, NS))
    p = bed.start_agent("cert-b", {}, kubeconfig=unbound, wait=False)
    assert p.wait(timeout=120) == 2
    log = (bed.workdir / "agent-cert-b.log").read_text()
    assert "--tls-from-cluster: CertificateSigningRequest" in log and "denied" in log and "bound to no node" in log


def test_the_operator_may_approve_and_sign_for_its_own_signer_only(issuing):
    cluster = issuing.cluster
    operator = f"system:serviceaccount:{NS}:{testbed.OPERATOR_SA}"

    def allowed(verb: str, signer: str) -> bool:
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
            "user": operator, "resourceAttributes": {"group": "certificates.k8s.io", "resource": "signers",
                                                     "verb": verb, "name": signer}}}
        out = cluster.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(review)).stdout
        return json.loads(out)["status"].get("allowed", False)

    def check():
        assert allowed("approve", tls.AGENT_SIGNER) and allowed("sign", tls.AGENT_SIGNER)
    eventually(check)
    for signer in ("kubernetes.io/kube-apiserver-client", "kubernetes.io/kubelet-serving", "consortium.io/other"):
        assert not allowed("approve", signer) and not allowed("sign", signer), signer


def test_requested_checks_the_request_itself():
    """What the operator reads from a request, without a server: only a request for exactly the
    bound node's name, from the agents, with a P-256 key, passes."""
    key = ec.generate_private_key(ec.SECP256R1())
    spec = {"username": AGENT_USER, "extra": {certificates.NODE_NAME_EXTRA: ["n1"]}, "usages": ["server auth"],
            "request": base64.b64encode(tls.signing_request("n1", key)).decode()}
    node, public, days = certificates.requested(spec, AGENT_USER)
    assert (node, public, days) == ("n1", key.public_key(), certificates.DAYS)
    assert certificates.requested({**spec, "expirationSeconds": 86400}, AGENT_USER)[2] == 1
    for change, why in (({"request": "not base64!"}, "not base64"),
                        ({"request": base64.b64encode(b"-----BEGIN CERTIFICATE REQUEST-----\n").decode()},
                         "not a PEM certificate signing request"),
                        ({"extra": {certificates.NODE_NAME_EXTRA: ["n1", "n2"]}}, "bound to no node"),
                        ({"usages": []}, "server auth only")):
        with pytest.raises(tls.TLSError, match=why):
            certificates.requested({**spec, **change}, AGENT_USER)
    with pytest.raises(tls.TLSError, match="names n1, n2, not only n1"):
        two = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n1")]))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName("n1"), x509.DNSName("n2")]), critical=False)
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        certificates.requested({**spec, "request": base64.b64encode(two).decode()}, AGENT_USER)


def test_the_operator_says_when_no_namespace_it_watches_exists(cluster):
    """kopf starts no watch at all, of certificate requests neither, before one exists: said at start."""
    from consortium import kube
    from consortium_operator import main as operator_main

    kube.load_config(str(cluster.kubeconfig))
    assert operator_main._existing(["default", "no-such-namespace", "team-*"]) == ["default", "team-*"]
    assert operator_main._existing(["no-such-namespace"]) == []
