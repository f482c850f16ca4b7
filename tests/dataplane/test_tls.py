"""Mutual TLS between the driver and the agents: who completes a handshake and who does not.

Real agents (in this process, on loopback) and real handshakes; Health is the call, so no model loads.
"""
import socket

import grpc
import pytest

from consortium import tls, wire
from consortium.driver.client import NodeClient, RpcLog
from consortium.wire import pb
from node_agent import main as agent_main
from node_agent import server
from node_agent.identity import NodeIdentity

CALL_S = 5.0


@pytest.fixture(scope="module")
def pki():
    ca = tls.CertificateAuthority.create()
    creds = {n: tls.Credentials(*ca.issue(n), ca.cert_pem) for n in ("n1", "n2", "N0")}
    driver = tls.Credentials(*ca.issue(tls.DRIVER_NAME, server=False), ca.cert_pem)
    return ca, creds, driver


@pytest.fixture(scope="module")
def agents(pki, tmp_path_factory):
    """n1 and N0 serving mutual TLS with their own certificates, and a plaintext agent."""
    _, creds, _ = pki
    out, servers = {}, []
    for name, c in (("n1", creds["n1"]), ("N0", creds["N0"]), ("plain", None)):
        ident = NodeIdentity.load_or_create(tmp_path_factory.mktemp("key") / "node.pem", name)
        srv, _, port = server.serve(ident, "127.0.0.1:0", server.AgentConfig(node_id=name, threads=1, n_ctx=64), tls=c)
        servers.append(srv)
        out[name] = f"127.0.0.1:{port}"
    yield out
    for s in servers:
        s.stop(None)


def health(endpoint: str, name: str, creds) -> pb.HealthResponse:
    client = NodeClient(name, endpoint, RpcLog(), CALL_S, creds)
    try:
        return client.call("Health", pb.HealthRequest())
    finally:
        client.close()


def refused(endpoint: str, name: str, creds) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        health(endpoint, name, creds)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    return e.value


def test_driver_reaches_the_node_it_expects(pki, agents):
    _, _, driver = pki
    assert health(agents["n1"], "n1", driver).node_id == "n1"
    assert health(agents["N0"], "N0", driver).node_id == "N0"   # names compare as DNS names do


def test_agent_with_another_nodes_certificate_is_refused(pki, agents):
    """Impersonation: the driver expects n2 at this address, the agent there proves it is n1."""
    _, _, driver = pki
    refused(agents["n1"], "n2", driver)


def test_another_agents_certificate_cannot_call_an_agent(pki, agents):
    """n2's certificate is from the same CA, but only the driver may fence or truncate n1's stages."""
    _, creds, _ = pki
    for method, req in (("Health", pb.HealthRequest()), ("Fence", pb.FenceRequest(ref=pb.StageRef(session="s", stage=0, epoch=9)))):
        client = NodeClient("n1", agents["n1"], RpcLog(), CALL_S, creds["n2"])
        with pytest.raises(grpc.RpcError) as e:
            client.call(method, req)
        client.close()
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "caller n2 is not one of consortium-driver" in e.value.details()


def test_callers_without_a_certificate_from_the_ca_are_refused(pki, agents):
    ca, creds, _ = pki
    no_cert = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem)
    ch = grpc.secure_channel(agents["n1"], no_cert, options=[("grpc.ssl_target_name_override", "n1")])
    with pytest.raises(grpc.RpcError) as e:
        wire.pb_grpc.NodeAgentStub(ch).Health(pb.HealthRequest(), timeout=CALL_S)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    ch.close()
    other = tls.CertificateAuthority.create("someone-else")
    stranger = tls.Credentials(*other.issue(tls.DRIVER_NAME, server=False), ca.cert_pem)  # trusts our CA, not ours
    refused(agents["n1"], "n1", stranger)


def test_agent_certificate_from_another_ca_is_refused(pki, tmp_path):
    _, _, driver = pki
    other = tls.CertificateAuthority.create("someone-else")
    forged = tls.Credentials(*other.issue("n2"), other.cert_pem)
    ident = NodeIdentity.load_or_create(tmp_path / "node.pem", "n2")
    srv, _, port = server.serve(ident, "127.0.0.1:0", server.AgentConfig(node_id="n2", threads=1, n_ctx=64), tls=forged)
    try:
        refused(f"127.0.0.1:{port}", "n2", driver)
    finally:
        srv.stop(None)


def test_plaintext_and_tls_do_not_mix(pki, agents):
    _, _, driver = pki
    refused(agents["n1"], "n1", None)          # plaintext client, TLS agent
    refused(agents["plain"], "plain", driver)  # TLS client, plaintext agent
    assert health(agents["plain"], "plain", None).node_id == "plain"   # --plaintext still works


def test_garbage_on_the_tls_port_leaves_the_agent_serving(pki, agents):
    _, _, driver = pki
    host, port = agents["n1"].rsplit(":", 1)
    for payload in (b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00" + b"\xff" * 512, b"PRI * HTTP/2.0"):
        with socket.create_connection((host, int(port)), timeout=CALL_S) as s:
            s.sendall(payload)
            s.settimeout(CALL_S)
            try:
                s.recv(4096)
            except (socket.timeout, ConnectionResetError):
                pass
    assert health(agents["n1"], "n1", driver).node_id == "n1"


def test_agent_flags_refuse_a_missing_or_mixed_tls_setup(tmp_path, capsys):
    key = str(tmp_path / "k.pem")
    ca = tls.CertificateAuthority.create()
    files = tls.Credentials(*ca.issue("n1"), ca.cert_pem).write(tmp_path / "n1")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    cases = [
        ([], "mutual TLS needs --tls-cert, --tls-key and --tls-ca (missing --tls-cert, --tls-key, --tls-ca)"),
        (["--tls-cert", files["cert"], "--tls-key", files["key"]], "missing --tls-ca"),
        (["--plaintext", "--tls-ca", files["ca"]], "--plaintext and --tls-ca exclude each other"),
        (["--tls-from-cluster", str(tmp_path / "asked"), "--tls-ca", files["ca"]],
         "--tls-from-cluster and --tls-cert/--tls-key/--tls-ca exclude each other (given --tls-ca, --tls-from-cluster)"),
        (["--tls-from-cluster", str(tmp_path / "asked")], "--tls-from-cluster asks the cluster: give --kubeconfig"),
        (["--tls-cert", str(tmp_path / "junk.pem"), "--tls-key", files["key"], "--tls-ca", files["ca"]],
         "the certificate is not a PEM X.509 certificate"),
        (["--tls-cert", str(tmp_path / "absent.pem"), "--tls-key", files["key"], "--tls-ca", files["ca"]],
         "cannot read the TLS cert file"),
        (["--tls-cert", files["cert"], "--tls-key", files["key"], "--tls-ca", files["ca"], "--name", "n2"],
         "the TLS certificate names 'n1', not this node ('n2')"),
    ]
    for extra, message in cases:
        assert agent_main.main(["--key-file", key, "--listen", "127.0.0.1:0", *extra]) == 2
        assert message in capsys.readouterr().err


def test_operator_given_the_ca_key_issues_its_own_client_certificate(tmp_path, capsys):
    from consortium_operator import main as operator_main

    ca = tls.CertificateAuthority.create()
    ca.save(tmp_path / "pki")
    crt, key = str(tmp_path / "pki" / "ca.crt"), str(tmp_path / "pki" / "ca.key")
    args = operator_main.build_parser().parse_args(["--tls-ca", crt, "--tls-ca-key", key])
    own = tls.from_args(args)
    cert = tls.x509.load_pem_x509_certificate(own.cert_pem)
    cert.verify_directly_issued_by(ca.cert)
    assert own.name == tls.DRIVER_NAME and own.ca_pem == ca.cert_pem
    tls.CertificateAuthority.create().save(tmp_path / "other")
    for extra, message in (
            (["--tls-ca-key", key], "--tls-ca-key goes with --tls-ca alone"),
            (["--tls-ca", crt, "--tls-ca-key", key, "--tls-cert", crt], "--tls-ca-key goes with --tls-ca alone"),
            (["--tls-ca", crt, "--tls-ca-key", str(tmp_path / "other" / "ca.key")], "is not the key of")):
        assert operator_main.main(extra) == 2
        assert message in capsys.readouterr().err


def test_certs_command_issues_certificates_that_handshake(tmp_path, capsys):
    from consortium import cli

    d = tmp_path / "pki"
    assert cli.main(["certs", str(d), "n7", "--driver"]) == 0
    proof = d / tls.DRIVER_NAME / "proof.pem"   # the operator's fraud-proof key, beside its certificate
    assert proof.stat().st_mode & 0o777 == 0o600
    first = NodeIdentity.load_or_create(proof).public_key_text
    assert cli.main(["certs", str(d), "n8", "--driver"]) == 0          # the same CA, loaded
    assert NodeIdentity.load_or_create(proof).public_key_text == first  # and the same proof key
    agent_creds = tls.Credentials.load(d / "n8" / "tls.crt", d / "n8" / "tls.key", d / "n8" / "ca.crt")
    driver = tls.Credentials.load(*(d / tls.DRIVER_NAME / f for f in ("tls.crt", "tls.key", "ca.crt")))
    assert agent_creds.name == "n8" and (d / "n8" / "tls.key").stat().st_mode & 0o077 == 0
    ident = NodeIdentity.load_or_create(tmp_path / "node.pem", "n8")
    srv, _, port = server.serve(ident, "127.0.0.1:0", server.AgentConfig(node_id="n8", threads=1, n_ctx=64),
                                tls=agent_creds)
    try:
        assert health(f"127.0.0.1:{port}", "n8", driver).node_id == "n8"
    finally:
        srv.stop(None)
    capsys.readouterr()
    (d / "ca.key").write_bytes(tls.CertificateAuthority.create().key.private_bytes(
        tls.serialization.Encoding.PEM, tls.serialization.PrivateFormat.PKCS8, tls.serialization.NoEncryption()))
    assert cli.main(["certs", str(d), "n9"]) == 2
    assert "is not the key of" in capsys.readouterr().err
    assert cli.main(["certs", str(tmp_path / "empty")]) == 2


def test_an_agent_keeps_its_asked_for_certificate_while_a_third_of_its_life_is_left(tmp_path):
    """node-agent --tls-from-cluster uses the certificate it kept only if it names the node, holds
    the kept key and is not near its end (then it asks the cluster again)."""
    from node_agent import certificate

    ca = tls.CertificateAuthority.create()
    key = certificate._key(tmp_path)
    assert certificate.kept(tmp_path, "n1") is None   # nothing kept yet

    def keep(name, days, public_key=key.public_key()):
        (tmp_path / "tls.crt").write_bytes(ca.certify(name, public_key, client=False, days=days))
        (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    keep("n1", 1)
    assert certificate.kept(tmp_path, "n1").name == "n1"
    assert certificate.kept(tmp_path, "n2") is None                                   # another node's
    keep("n1", 0.001)                                                                 # 86 s of 6 minutes left
    assert certificate.kept(tmp_path, "n1") is None
    keep("n1", 1, public_key=tls._new_key().public_key())                             # not for the kept key
    assert certificate.kept(tmp_path, "n1") is None
    keep("n1", 1)
    (tmp_path / "ca.crt").write_bytes(tls.CertificateAuthority.create().cert_pem)     # not issued by ca.crt
    assert certificate.kept(tmp_path, "n1") is None



def test_rotating_credentials_present_the_new_certificate_to_new_connections(tmp_path):
    """An agent serving tls.Rotating credentials: after update(), new handshakes on the gRPC port and
    the data lane get the new certificate and need callers of its CA (here a second CA, so that the
    switch shows: the old CA's driver is refused, the new one's served)."""
    import socket
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    first, second = tls.CertificateAuthority.create(), tls.CertificateAuthority.create()
    creds = [tls.Credentials(*ca.issue("n5"), ca.cert_pem) for ca in (first, second)]
    drivers = [tls.Credentials(*ca.issue(tls.DRIVER_NAME, server=False), ca.cert_pem) for ca in (first, second)]
    rotating = tls.Rotating(creds[0])
    ident = NodeIdentity.load_or_create(tmp_path / "node.pem", "n5")
    srv, service, port = server.serve(ident, "127.0.0.1:0", server.AgentConfig(node_id="n5", threads=1, n_ctx=64),
                                      tls=rotating)

    def lane_certificate(driver) -> bytes:
        ctx = driver.ssl_context(server=False, peer_name="n5")
        with socket.create_connection(("127.0.0.1", service.data_port), timeout=CALL_S) as raw:
            with ctx.wrap_socket(raw, server_hostname="n5") as conn:
                return conn.getpeercert(binary_form=True)

    def der(creds) -> bytes:
        return x509.load_pem_x509_certificate(creds.cert_pem).public_bytes(serialization.Encoding.DER)
    try:
        assert health(f"127.0.0.1:{port}", "n5", drivers[0]).node_id == "n5"
        assert lane_certificate(drivers[0]) == der(creds[0])
        with pytest.raises(tls.TLSError, match="cannot replace one for 'n5'"):
            rotating.update(tls.Credentials(*second.issue("n6"), second.cert_pem))
        rotating.update(creds[1])
        assert health(f"127.0.0.1:{port}", "n5", drivers[1]).node_id == "n5"
        refused(f"127.0.0.1:{port}", "n5", drivers[0])
        assert lane_certificate(drivers[1]) == der(creds[1])
        with pytest.raises(ssl.SSLError):   # the lane presents the new CA's certificate to the old CA's driver
            lane_certificate(drivers[0])
    finally:
        srv.stop(None)


def test_the_renewer_asks_again_when_a_third_of_the_life_is_left(tmp_path, monkeypatch):
    """node_agent.certificate.Renewer, the cluster's answer stood in by a CA here (the whole round
    trip through the API and the operator is tests/k8s/test_certificates.py): a certificate past its
    renewal point is renewed at once, the new one not before its own."""
    import threading
    import time

    from node_agent import certificate

    ca = tls.CertificateAuthority.create()
    key = certificate._key(tmp_path)
    short = tls.Credentials(ca.certify("n1", key.public_key(), client=False, days=0.001),
                            (tmp_path / "tls.key").read_bytes(), ca.cert_pem)
    assert certificate.renewal_due(short) < certificate.kube.now()
    asked = threading.Event()

    def ask(d, name, **_):
        asked.set()
        return tls.Credentials(ca.certify(name, key.public_key(), client=False, days=30), short.key_pem, ca.cert_pem)
    monkeypatch.setattr(certificate, "ask", ask)
    rotating = tls.Rotating(short)
    renewer = certificate.Renewer(rotating, tmp_path, "n1").start()
    try:
        assert asked.wait(10)
        deadline = time.monotonic() + 10
        while not renewer.renewals and time.monotonic() < deadline:
            time.sleep(0.05)
        assert renewer.renewals == 1 and rotating.current is not short
        assert (certificate.renewal_due(rotating.current) - certificate.kube.now()).days >= 19   # 20 of its 30 days
    finally:
        renewer.stop()

