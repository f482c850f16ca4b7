"""Agent certificates issued by the operator, through the Kubernetes CertificateSigningRequest API.

Given the CA's key (`consortium-operator --tls-ca-key`), the operator signs the requests of signer
`consortium.io/agent`: an agent started with `--tls-from-cluster` makes its own key and asks for a
certificate naming its node. The operator approves and signs a request only when the API server
says it came from the agents' ServiceAccount with a token bound to that very node (the requester's
name and the token's node are written into the request by the API server, not by the caller), and
the request asks for nothing but that name; otherwise it denies it with the reason. The node-bound
token is the credential the admin gave that machine: the certificate lets it prove on the gRPC links
what the token already lets it say to the API server. Whether the node gets work is still the
ComputeNode's approval.
"""
from __future__ import annotations

import base64
import logging

from consortium import kube, tls

log = logging.getLogger("consortium.operator.certificates")

# Where the API server puts the node a ServiceAccount token is bound to (as the admission policy reads it).
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
# An agent's certificate serves its gRPC port and data lane; it is never a client (agents call no one).
USAGES = {"digital signature", "key encipherment", "server auth"}
DAYS = 365   # as `consortium certs` issues them; shorter when the request asks (spec.expirationSeconds)


def requested(spec: dict, agent_user: str):
    """(node, public key, days) of a request this operator signs; TLSError says why not."""
    who = spec.get("username") or "?"
    if who != agent_user:
        raise tls.TLSError(f"asked by {who}, not the agents' ServiceAccount {agent_user}")
    nodes = (spec.get("extra") or {}).get(NODE_NAME_EXTRA) or []
    if len(nodes) != 1 or not nodes[0]:
        raise tls.TLSError("the requester's token is bound to no node (kubectl create token ... "
                           "--bound-object-kind Node --bound-object-name NODE)")
    usages = set(spec.get("usages") or [])
    if "server auth" not in usages or not usages <= USAGES:
        raise tls.TLSError(f"usages {sorted(usages)}: an agent certificate is for server auth only")
    try:
        pem = base64.b64decode(spec.get("request") or "", validate=True)
    except ValueError:
        raise tls.TLSError("spec.request is not base64") from None
    key = tls.requested_key(pem, nodes[0])
    seconds = spec.get("expirationSeconds")
    return nodes[0], key, min(DAYS, seconds / 86400) if seconds else DAYS


def settled(obj: dict) -> bool:
    status = obj.get("status") or {}
    return bool(status.get("certificate")) or any(
        c.get("type") in ("Denied", "Failed") for c in status.get("conditions") or [])


def _condition(type_: str, reason: str, message: str) -> dict:
    return {"type": type_, "status": "True", "reason": reason, "message": message,
            "lastUpdateTime": kube.timestamp()}


def handle(name: str, ca: tls.CertificateAuthority, agent_user: str) -> None:
    """Settle one request of our signer: approve and sign it, or deny it (Failed if someone else
    approved it already). An API error propagates (kopf retries)."""
    api = kube.certificates()
    obj = api.api_client.sanitize_for_serialization(api.read_certificate_signing_request(name))
    if settled(obj):
        return
    conditions = (obj.get("status") or {}).get("conditions") or []
    approved = any(c.get("type") == "Approved" for c in conditions)
    try:
        node, key, days = requested(obj["spec"], agent_user)
    except tls.TLSError as e:
        obj.setdefault("status", {})["conditions"] = [*conditions, _condition(
            "Failed" if approved else "Denied", "NotThisNodesAgent", str(e))]
        if approved:
            api.replace_certificate_signing_request_status(name, obj)
        else:
            api.replace_certificate_signing_request_approval(name, obj)
        log.warning("certificate request %s refused: %s", name, e)
        return
    if not approved:
        obj.setdefault("status", {})["conditions"] = [*conditions, _condition(
            "Approved", "AgentOfThisNode", f"asked by the agent of node {node} (its token is bound to it)")]
        obj = api.api_client.sanitize_for_serialization(api.replace_certificate_signing_request_approval(name, obj))
    # The chain ends with the CA, which the agent then trusts for its callers (the operator).
    chain = ca.certify(node, key, server=True, client=False, days=days) + ca.cert_pem
    obj["status"]["certificate"] = base64.b64encode(chain).decode("ascii")
    api.replace_certificate_signing_request_status(name, obj)
    log.info("certificate request %s: signed a certificate naming %s for %.0f days", name, node, days)


def register(ca: tls.CertificateAuthority, agent_user: str) -> None:
    """The kopf handlers that settle every request of our signer, new or waiting at start-up."""
    import kopf

    where = dict(field="spec.signerName", value=tls.AGENT_SIGNER)

    @kopf.on.resume("certificates.k8s.io", "v1", "certificatesigningrequests", **where)
    @kopf.on.create("certificates.k8s.io", "v1", "certificatesigningrequests", **where)
    def sign_agent_certificate(name, **_) -> None:   # a result would be written into the request's status
        try:
            handle(name, ca, agent_user)
        except Exception as e:  # noqa: BLE001 - an API conflict or outage: try again
            if kube.transient(e) or kube.is_status(e, 409):
                raise kopf.TemporaryError(f"certificate request {name}: {kube.reason(e)}", delay=2) from e
            raise
