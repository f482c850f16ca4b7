"""Mutual TLS for the gRPC links between the session driver (the operator, or the standalone driver)
and the node agents.

One CA signs every certificate. An agent's certificate names its node (the ComputeNode name) as its
only DNS subject alternative name; the driver dials an agent expecting that name, so an agent holding
another node's certificate, or none from this CA, fails the handshake. The agent asks every caller
for a certificate from the same CA. Keys are ECDSA P-256, which gRPC's TLS accepts everywhere.
"""
from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import ssl
import tempfile
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateAuthority", "Credentials", "Rotating", "TLSError", "secure_channel", "local_pki",
           "signing_request", "requested_key"]

DRIVER_NAME = "consortium-driver"   # the client certificate's name for the driver/operator
# The Kubernetes CertificateSigningRequest signer of agent certificates, when the operator issues them.
AGENT_SIGNER = "consortium.io/agent"


class TLSError(ValueError):
    """A certificate, key or CA file that cannot be used; the message says which and why."""


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclasses.dataclass(frozen=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "consortium-ca", days: int = 365) -> "CertificateAuthority":
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_now() - datetime.timedelta(minutes=5))
                .not_valid_after(_now() + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def save(self, directory: str | os.PathLike) -> None:
        """ca.crt and ca.key (0600) in `directory`; never overwrites an existing CA."""
        d = Path(directory)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(d / "ca.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(_key_pem(self.key))
        (d / "ca.crt").write_bytes(self.cert_pem)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CertificateAuthority":
        """ca.crt and ca.key of `directory` (what save wrote)."""
        return cls.load_files(Path(directory) / "ca.crt", Path(directory) / "ca.key")

    @classmethod
    def load_files(cls, cert_file: str | os.PathLike, key_file: str | os.PathLike) -> "CertificateAuthority":
        try:
            cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
            key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
        except OSError as e:
            raise TLSError(f"cannot read the CA: {e.strerror}: {e.filename}") from None
        except (ValueError, TypeError) as e:
            raise TLSError(f"the CA {cert_file}, {key_file} is not a PEM certificate and unencrypted key: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise TLSError(f"{key_file} is not the key of {cert_file}")
        return cls(key, cert)

    def issue(self, name: str, *, server: bool = True, client: bool = True, days: int = 365,
              addresses: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for `name`: a node's name (server) or the driver's (client).
        `addresses` are extra IP subject alternative names (not needed by the driver, which checks
        the name)."""
        key = _new_key()
        return self.certify(name, key.public_key(), server=server, client=client, days=days,
                            addresses=addresses), _key_pem(key)

    def certify(self, name: str, public_key, *, server: bool = True, client: bool = True, days: float = 365,
                addresses: tuple[str, ...] = ()) -> bytes:
        """A certificate PEM naming `name` for a key held elsewhere (a signing request's), valid for
        `days` but never past the CA's own end."""
        if not name or len(name) > 253:
            raise TLSError(f"certificate name {name!r} must be 1-253 characters")
        until = min(_now() + datetime.timedelta(days=days), self.cert.not_valid_after_utc)
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        sans = [x509.DNSName(name)] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(self.cert.subject).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(_now() - datetime.timedelta(minutes=5))
                .not_valid_after(until)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .sign(self.key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What one process holds: its certificate and key, and the CA it trusts (all PEM)."""
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def __post_init__(self):
        for what, pem in (("certificate", self.cert_pem), ("CA certificate", self.ca_pem)):
            try:
                x509.load_pem_x509_certificate(pem)
            except ValueError as e:
                raise TLSError(f"the {what} is not a PEM X.509 certificate: {e}") from None
        try:
            serialization.load_pem_private_key(self.key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise TLSError(f"the TLS key is not an unencrypted PEM private key: {e}") from None

    @classmethod
    def load(cls, cert: str | os.PathLike, key: str | os.PathLike, ca: str | os.PathLike) -> "Credentials":
        data = {}
        for what, path in (("cert", cert), ("key", key), ("ca", ca)):
            try:
                data[what] = Path(path).read_bytes()
            except OSError as e:
                raise TLSError(f"cannot read the TLS {what} file {path}: {e.strerror}") from None
        return cls(data["cert"], data["key"], data["ca"])

    @property
    def name(self) -> str:
        """The certificate's DNS name (the node's name for an agent)."""
        cert = x509.load_pem_x509_certificate(self.cert_pem)
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.DNSName)
        except x509.ExtensionNotFound:
            names = []
        return names[0] if names else ""

    def server_credentials(self):
        import grpc

        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem,
                                           require_client_auth=True)

    def channel_credentials(self):
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)

    def ssl_context(self, *, server: bool, peer_name: str | None = None) -> ssl.SSLContext:
        """The same mutual TLS for a plain socket (the data lane): the server asks every caller for a
        certificate from our CA; the client only completes its handshake with the node `peer_name`."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = not server and peer_name is not None
        _load_identity(ctx, self)
        return ctx

    def write(self, directory: str | os.PathLike) -> dict[str, str]:
        """Write tls.crt, tls.key (0600) and ca.crt into `directory`; returns their paths by role."""
        d = Path(directory)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        paths = {"cert": d / "tls.crt", "key": d / "tls.key", "ca": d / "ca.crt"}
        paths["cert"].write_bytes(self.cert_pem)
        paths["ca"].write_bytes(self.ca_pem)
        fd = os.open(paths["key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)
        return {k: str(v) for k, v in paths.items()}


class Rotating:
    """A serving process's credentials that it may replace while it runs (an agent renewing the
    certificate it asked the cluster for): each new handshake, on the gRPC port (gRPC asks for the
    certificate at every new connection) and on the data lane (its contexts are reloaded), presents
    the newest certificate and requires callers of the newest CA; connections already open keep
    theirs. Has the serving side of Credentials' interface."""

    def __init__(self, creds: Credentials):
        self.current = creds
        self._lock = threading.Lock()
        self._contexts: list[ssl.SSLContext] = []

    @property
    def name(self) -> str:
        return self.current.name

    def update(self, creds: Credentials) -> None:
        if creds.name != self.current.name:
            raise TLSError(f"a certificate for {creds.name!r} cannot replace one for {self.current.name!r}")
        with self._lock:
            self.current = creds
            for ctx in self._contexts:
                _load_identity(ctx, creds)

    def server_credentials(self):
        import grpc

        def config(creds: Credentials):
            return grpc.ssl_server_certificate_configuration([(creds.key_pem, creds.cert_pem)],
                                                             root_certificates=creds.ca_pem)
        served = [self.current]

        def fetch():   # gRPC's question at each new connection: None keeps what it has
            with self._lock:
                if self.current is served[0]:
                    return None
                served[0] = self.current
                return config(self.current)
        return grpc.dynamic_ssl_server_credentials(config(self.current), fetch, require_client_authentication=True)

    def ssl_context(self, *, server: bool, peer_name: str | None = None) -> ssl.SSLContext:
        with self._lock:
            ctx = self.current.ssl_context(server=server, peer_name=peer_name)
            self._contexts.append(ctx)
        return ctx


def _load_identity(ctx: ssl.SSLContext, creds: Credentials) -> None:
    """Put `creds`' certificate, key and CA into `ctx` (ssl loads a chain only from files: written for
    the call into a private folder). A context trusts every CA loaded into it: a renewal keeps its CA."""
    ctx.load_verify_locations(cadata=creds.ca_pem.decode())
    with tempfile.TemporaryDirectory(prefix="consortium-tls-") as d:
        paths = creds.write(d)
        ctx.load_cert_chain(paths["cert"], paths["key"])


# -- certificates through the Kubernetes API (CertificateSigningRequests) ----------------------------


def signing_request(name: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PKCS#10 request PEM for an agent certificate naming node `name` (its key stays with the agent)."""
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def requested_key(request_pem: bytes, name: str):
    """The public key of a signing request that asks for exactly an agent certificate naming `name`:
    a valid self-signature, an ECDSA P-256 key, the common name (if any) and the only subject
    alternative name both `name`, no other extension. TLSError says what is wrong."""
    try:
        req = x509.load_pem_x509_csr(request_pem)
    except ValueError as e:
        raise TLSError(f"the request is not a PEM certificate signing request: {e}") from None
    if not req.is_signature_valid:
        raise TLSError("the request's signature does not verify under its own key")
    key = req.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise TLSError("the request's key is not ECDSA P-256")
    common = [a.value for a in req.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if common not in ([], [name]) or len(req.subject) != len(common):
        raise TLSError(f"the request's subject is {req.subject.rfc4514_string()!r}, not CN={name}")
    others = [e.oid.dotted_string for e in req.extensions if not isinstance(e.value, x509.SubjectAlternativeName)]
    if others:
        raise TLSError(f"the request asks for extensions other than its name: {', '.join(others)}")
    try:
        sans = req.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = []
    if [repr(v) for v in sans] != [repr(x509.DNSName(name))]:
        raise TLSError(f"the request names {', '.join(str(v.value) for v in sans) or 'nothing'}, not only {name}")
    return key


def secure_channel(endpoint: str, node_name: str, creds: Credentials, options=()):
    """A channel to the agent at `endpoint` that only completes its handshake if the agent presents
    a certificate from our CA naming `node_name` (whatever host or address `endpoint` has)."""
    import grpc

    return grpc.secure_channel(endpoint, creds.channel_credentials(),
                               options=[*options, ("grpc.ssl_target_name_override", node_name)])


def local_pki(directory: str | os.PathLike, nodes: list[str]) -> tuple[dict[str, dict[str, str]], Credentials]:
    """A CA made for one run: per-node agent certificates written under `directory`/<node>/, and the
    driver's client credentials. Returns ({node: {cert, key, ca paths}}, driver credentials)."""
    ca = CertificateAuthority.create()
    files = {n: Credentials(*ca.issue(n), ca.cert_pem).write(Path(directory) / n) for n in nodes}
    driver = Credentials(*ca.issue(DRIVER_NAME, server=False), ca.cert_pem)
    driver.write(Path(directory) / DRIVER_NAME)
    return files, driver


def add_arguments(p, role: str) -> None:
    """--tls-cert/--tls-key/--tls-ca and --plaintext, for the agent ("agent") or the driver ("driver");
    defaults from CONSORTIUM_TLS_CERT, CONSORTIUM_TLS_KEY, CONSORTIUM_TLS_CA and CONSORTIUM_PLAINTEXT=1
    (what the chart sets from a mounted Secret). Certificates may instead come through the cluster:
    the operator, given the CA's key (--tls-ca-key), issues its own and signs the agents' requests;
    an agent asks for one (--tls-from-cluster)."""
    env = os.environ.get
    whose = "the node's certificate (its DNS name is the node's name)" if role == "agent" else \
        "the driver's client certificate"
    g = p.add_argument_group("mutual TLS", "every gRPC link is mutual TLS under one CA; --plaintext only for "
                                           "local development")
    g.add_argument("--tls-cert", default=env("CONSORTIUM_TLS_CERT"), help=f"PEM file: {whose}")
    g.add_argument("--tls-key", default=env("CONSORTIUM_TLS_KEY"), help="PEM file: its private key")
    g.add_argument("--tls-ca", default=env("CONSORTIUM_TLS_CA"),
                   help="PEM file: the CA that signed every agent's and the driver's certificate")
    if role == "agent":
        g.add_argument("--tls-from-cluster", metavar="DIR", default=env("CONSORTIUM_TLS_FROM_CLUSTER"),
                       help="instead of --tls-*: make a key in DIR and ask the cluster for a certificate naming "
                            "this node (a CertificateSigningRequest the operator signs for the agent whose token "
                            "is bound to this node); kept in DIR, and renewed, at start or while serving, once a "
                            "third of its lifetime is left")
    else:
        g.add_argument("--tls-ca-key", default=env("CONSORTIUM_TLS_CA_KEY"),
                       help="PEM file: the key of --tls-ca. The operator then issues its own client certificate "
                            "(instead of --tls-cert/--tls-key) and signs the certificates agents ask for "
                            "(node-agent --tls-from-cluster)")
    g.add_argument("--plaintext", action="store_true", default=env("CONSORTIUM_PLAINTEXT") == "1",
                   help="no TLS (development only: anyone on the network reads prompts and activations "
                        "and can pose as any node)")


def from_args(args) -> Credentials | None:
    """The credentials the flags name, or None for --plaintext or a certificate the agent will ask the
    cluster for (--tls-from-cluster); TLSError says what is missing or contradictory."""
    flags = ("tls_cert", "tls_key", "tls_ca", "tls_ca_key", "tls_from_cluster")
    given = [f for f in flags if getattr(args, f, None)]
    named = ", ".join(f"--{f.replace('_', '-')}" for f in given)
    if args.plaintext:
        if given:
            raise TLSError(f"--plaintext and {named} exclude each other")
        return None
    if getattr(args, "tls_from_cluster", None):
        if given != ["tls_from_cluster"]:
            raise TLSError(f"--tls-from-cluster and --tls-cert/--tls-key/--tls-ca exclude each other (given {named})")
        return None
    if getattr(args, "tls_ca_key", None):
        if given != ["tls_ca", "tls_ca_key"]:
            raise TLSError(f"--tls-ca-key goes with --tls-ca alone: the operator issues its own certificate "
                           f"(given {named})")
        ca = CertificateAuthority.load_files(args.tls_ca, args.tls_ca_key)
        return Credentials(*ca.issue(DRIVER_NAME, server=False), ca.cert_pem)
    if len(given) != 3:
        missing = [f"--{f.replace('_', '-')}" for f in ("tls_cert", "tls_key", "tls_ca") if f not in given]
        raise TLSError(f"mutual TLS needs --tls-cert, --tls-key and --tls-ca (missing {', '.join(missing)}); "
                       "pass --plaintext for local development without TLS")
    return Credentials.load(args.tls_cert, args.tls_key, args.tls_ca)
