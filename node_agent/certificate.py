"""`node-agent --tls-from-cluster DIR`: the agent's certificate asked of the cluster instead of
copied onto the machine by the admin.

The agent makes its TLS key in DIR (it never leaves the machine) and creates a
CertificateSigningRequest of signer consortium.io/agent for a certificate naming its node; the
operator signs it when the agent's token is bound to that node (consortium_operator.certificates).
The chain the operator returns ends with its CA, which the agent then requires of its callers. The
certificate is kept in DIR beside the key and used again at the next start while more than a third
of its lifetime is left. A running agent renews it then too, as a kubelet renews its own (Renewer):
it asks again with the same key and serves the new certificate to every new connection
(tls.Rotating), while connections already open keep theirs.
"""
from __future__ import annotations

import base64
import datetime
import logging
import os
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from consortium import kube, tls

log = logging.getLogger("node_agent.certificate")

RENEW_AT = 1 / 3   # of a certificate's lifetime left: ask for a new one
WAIT_LOG_S = 30.0   # how often a waiting agent says it still waits
RETRY_S = 60.0      # after a renewal that failed


def _key(directory: Path) -> ec.EllipticCurvePrivateKey:
    """DIR/tls.key, made (mode 0600) if missing."""
    path = directory / "tls.key"
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise tls.TLSError(f"{path} is not an ECDSA key")
        return key
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return key


def kept(directory: Path, name: str) -> tls.Credentials | None:
    """The certificate DIR already holds, if it names `name`, belongs to DIR's key, was issued by
    DIR's ca.crt (the files are written one after another) and has more than RENEW_AT of its
    lifetime left."""
    paths = [directory / f for f in ("tls.crt", "tls.key", "ca.crt")]
    if not all(p.exists() for p in paths):
        return None
    try:
        creds = tls.Credentials.load(*paths)
    except tls.TLSError as e:
        log.warning("the certificate in %s cannot be used (%s): asking for a new one", directory, e)
        return None
    cert = x509.load_pem_x509_certificate(creds.cert_pem)
    key = serialization.load_pem_private_key(creds.key_pem, password=None)
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(creds.ca_pem))
    except Exception:  # noqa: BLE001 - InvalidSignature, ValueError, TypeError: not that CA's
        return None
    if creds.name != name or cert.public_key() != key.public_key() or renewal_due(creds) <= kube.now():
        return None
    return creds


def renewal_due(creds: tls.Credentials) -> datetime.datetime:
    """When a certificate has RENEW_AT of its lifetime left."""
    cert = x509.load_pem_x509_certificate(creds.cert_pem)
    return cert.not_valid_after_utc - RENEW_AT * (cert.not_valid_after_utc - cert.not_valid_before_utc)


def from_cluster(directory: str | os.PathLike, name: str, *, poll_s: float = 1.0) -> tls.Credentials:
    """The agent's credentials for node `name`: the ones kept in `directory`, else a new certificate
    asked of the cluster (waits for the operator as long as it takes, saying so every WAIT_LOG_S).
    TLSError if the request is denied or fails, with the operator's reason."""
    d = Path(directory)
    have = kept(d, name)
    if have is not None:
        log.info("TLS certificate for %s from %s (kept from an earlier start)", name, d)
        return have
    return ask(d, name, poll_s=poll_s)


def ask(d: Path, name: str, *, poll_s: float = 1.0) -> tls.Credentials:
    """A new certificate for DIR's key (made if missing), asked of the cluster and kept in DIR."""
    key = _key(d)
    api = kube.certificates()
    made = api.create_certificate_signing_request({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"generateName": f"consortium-agent-{name}-"[:200]},
        "spec": {"request": base64.b64encode(tls.signing_request(name, key)).decode("ascii"),
                 "signerName": tls.AGENT_SIGNER, "usages": ["digital signature", "server auth"]}})
    csr = made.metadata.name
    log.info("asked the cluster for a certificate naming %s: CertificateSigningRequest %s (signer %s); "
             "waiting for the operator to sign it", name, csr, tls.AGENT_SIGNER)
    began = said = time.monotonic()
    while True:
        try:
            status = api.read_certificate_signing_request(csr).status
        except Exception as e:  # noqa: BLE001 - an API server restarting: the request is still there
            if not kube.transient(e):
                raise
            log.warning("reading CertificateSigningRequest %s failed (%s); trying again", csr, kube.reason(e))
            status = None
        for c in (status.conditions if status else None) or []:
            if c.type in ("Denied", "Failed"):
                raise tls.TLSError(f"CertificateSigningRequest {csr} {c.type.lower()}: {c.reason}: {c.message}")
        if status and status.certificate:
            return _keep(d, name, key, base64.b64decode(status.certificate), csr)
        now = time.monotonic()
        if now - said >= WAIT_LOG_S:
            said = now
            log.info("still waiting for CertificateSigningRequest %s to be signed (%.0f s; the operator signs it "
                     "when it runs with --tls-ca-key, the chart's tls.issuer operator)", csr, now - began)
        time.sleep(poll_s)


def _keep(d: Path, name: str, key, chain_pem: bytes, csr: str) -> tls.Credentials:
    """Check the returned chain (a certificate for this key naming `name`, issued by the CA at its
    end) and write tls.crt and ca.crt beside the key."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as e:
        raise tls.TLSError(f"CertificateSigningRequest {csr}: the certificate is not PEM: {e}") from None
    leaf, ca = chain[0], chain[-1]
    try:
        leaf.verify_directly_issued_by(ca)
    except Exception as e:  # noqa: BLE001 - InvalidSignature, ValueError, TypeError: all mean not issued by it
        raise tls.TLSError(f"CertificateSigningRequest {csr}: the certificate is not issued by the CA its chain "
                           f"ends with ({e or type(e).__name__})") from None
    pem = serialization.Encoding.PEM
    creds = tls.Credentials(leaf.public_bytes(pem), key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), ca.public_bytes(pem))
    if creds.name != name or leaf.public_key() != key.public_key():
        raise tls.TLSError(f"CertificateSigningRequest {csr}: the certificate names {creds.name!r} or holds another "
                           f"key, not this node's ({name})")
    creds.write(d)
    log.info("TLS certificate for %s signed by %s, valid until %s, kept in %s", name,
             ca.subject.rfc4514_string(), leaf.not_valid_after_utc.isoformat(timespec="seconds"), d)
    return creds


class Renewer:
    """Renews a running agent's certificate when RENEW_AT of its lifetime is left (again RETRY_S
    after a failed try), into `rotating`, which serves it to new connections."""

    def __init__(self, rotating: tls.Rotating, directory: str | os.PathLike, name: str):
        self.rotating, self.directory, self.name = rotating, Path(directory), name
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tls-renewer", daemon=True)

    def start(self) -> "Renewer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def renew(self) -> None:
        """Ask now (the loop calls it when due)."""
        self.rotating.update(ask(self.directory, self.name))
        self.renewals += 1

    def _run(self) -> None:
        due = renewal_due(self.rotating.current)
        while not self._stop.wait(max(0.0, (due - kube.now()).total_seconds())):
            try:
                self.renew()
                due = renewal_due(self.rotating.current)
            except Exception as e:  # noqa: BLE001 - the certificate in use stays valid meanwhile
                log.warning("renewing the TLS certificate for %s failed (%s); trying again in %.0f s", self.name,
                            e if isinstance(e, tls.TLSError) else kube.reason(e), RETRY_S)
                due = kube.now() + datetime.timedelta(seconds=RETRY_S)
