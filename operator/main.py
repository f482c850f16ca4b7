"""`consortium-operator`: the kopf operator that drives InferenceSessions (with --leader-elect, one of several replicas).

kopf runs in standalone mode (no peering objects); with --leader-elect only the holder of a Lease
runs it, the other replicas waiting to take over (operator/leadership.py).

Out of the cluster it reads --kubeconfig (or KUBECONFIG); in a pod, its ServiceAccount. It watches
--namespace (repeatable; CONSORTIUM_WATCH_NAMESPACES, comma list) or every namespace. kopf's own
progress and diff-base go into annotations under consortium.io/: the CRDs' structural schemas
would prune kopf's default status.kopf field.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from consortium import tls


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="consortium-operator", description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, else in-cluster)")
    p.add_argument("--namespace", "-n", action="append", default=None,
                   help="namespace to watch (repeatable; default: CONSORTIUM_WATCH_NAMESPACES or all)")
    p.add_argument("--agent-namespace", default=os.environ.get("CONSORTIUM_NAMESPACE", "consortium-system"),
                   help="where the agents' Leases live (the chart's release namespace)")
    p.add_argument("--agent-service-account", metavar="NAME",
                   default=os.environ.get("CONSORTIUM_AGENT_SERVICE_ACCOUNT", "consortium-agent"),
                   help="the agents' ServiceAccount in --agent-namespace: with --tls-ca-key, only its tokens bound "
                        "to a node get a certificate naming that node (default CONSORTIUM_AGENT_SERVICE_ACCOUNT, "
                        "else consortium-agent)")
    p.add_argument("--log-level", default=os.environ.get("CONSORTIUM_LOG_LEVEL", "info"))
    p.add_argument("--metrics-port", type=int, default=os.environ.get("CONSORTIUM_METRICS_PORT") or "0",
                   metavar="PORT", help="serve Prometheus metrics at :PORT/metrics (default CONSORTIUM_METRICS_PORT; "
                                        "0: off)")
    p.add_argument("--liveness", help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--proof-key", default=os.environ.get("CONSORTIUM_PROOF_KEY"),
                   help="Ed25519 key file (PKCS#8 PEM, mode 0600; created if absent) with which the operator "
                        "signs fraud proofs as the coordinator (default: CONSORTIUM_PROOF_KEY, else the PEM text "
                        "in CONSORTIUM_PROOF_KEY_PEM, else a new key per session, named in each proof)")
    p.add_argument("--status-budget-bytes", type=int, metavar="N",
                   default=os.environ.get("CONSORTIUM_STATUS_BUDGET_BYTES") or "1310720",
                   help="a session stops generating (stopped: status_full) once its status reaches N bytes, so "
                        "that the object stays under etcd's request limit (default CONSORTIUM_STATUS_BUDGET_BYTES, "
                        "else 1310720: 1.25 MiB, for etcd's default 1.5 MiB)")
    p.add_argument("--leader-elect", action="store_true",
                   default=os.environ.get("CONSORTIUM_LEADER_ELECT") == "1",
                   help="run as one of several replicas: only the holder of the Lease consortium-operator-leader "
                        "in --agent-namespace drives sessions; the others wait to take over (default "
                        "CONSORTIUM_LEADER_ELECT=1; the chart sets it with operator.replicas > 1)")
    p.add_argument("--leader-lease-seconds", type=int, default=30, metavar="S",
                   help="how long a leader's Lease holds without renewal before another replica takes it (default 30)")
    p.add_argument("--leader-renew-seconds", type=int, default=20, metavar="S",
                   help="a leader that could not renew its Lease for this long exits (default 20; below the lease)")
    tls.add_arguments(p, "driver")
    return p


def proof_identity(path: str | None, pem: str | None):
    """The key that signs fraud proofs: the --proof-key file, else the PEM text of
    CONSORTIUM_PROOF_KEY_PEM (the chart fills it from proof.pem in the operator's Secret: a file
    mounted from a Secret is group-readable under the pod's fsGroup, which key files may not be),
    else None (a new key per session)."""
    from node_agent.identity import NodeIdentity

    if path:
        return NodeIdentity.load_or_create(path, "consortium-operator")
    if pem:
        return NodeIdentity.from_pem(pem.encode(), "consortium-operator", "CONSORTIUM_PROOF_KEY_PEM")
    return None


def _existing(namespaces: list[str]) -> list[str]:
    """Those of `namespaces` that exist now; patterns (kopf's globs) and, if the API cannot say,
    every one count as existing."""
    from consortium import kube

    try:
        names = {n.metadata.name for n in kube.core().list_namespace(_request_timeout=10).items}
    except Exception:  # noqa: BLE001 - only a warning depends on it
        return list(namespaces)
    return [p for p in namespaces if p in names or any(c in p for c in "*?!,")]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.status_budget_bytes < 1:
        print("error: --status-budget-bytes must be positive", file=sys.stderr)
        return 2
    if args.leader_elect and not 1 <= args.leader_renew_seconds < args.leader_lease_seconds:
        print("error: --leader-renew-seconds must be at least 1 and below --leader-lease-seconds", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        creds = tls.from_args(args)
    except tls.TLSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        proof_key = proof_identity(args.proof_key, os.environ.get("CONSORTIUM_PROOF_KEY_PEM"))
    except (PermissionError, ValueError, OSError) as e:
        print(f"error: --proof-key: {e}", file=sys.stderr)
        return 2
    if args.kubeconfig:
        # kopf's login and the kubernetes client both read it from here.
        os.environ["KUBECONFIG"] = args.kubeconfig
    os.environ["CONSORTIUM_NAMESPACE"] = args.agent_namespace
    import kopf

    from consortium import kube
    from consortium_operator import sessions  # noqa: F401 - registers the handlers

    if args.tls_ca_key:
        from consortium_operator import certificates

        certificates.register(tls.CertificateAuthority.load_files(args.tls_ca, args.tls_ca_key),
                              f"system:serviceaccount:{args.agent_namespace}:{args.agent_service_account}")

    kube.load_config(args.kubeconfig)
    if args.metrics_port:
        from consortium import metrics
        from consortium_operator.metrics import SessionCollector

        try:
            metrics.serve([SessionCollector()], args.metrics_port)
        except OSError as e:
            print(f"error: --metrics-port {args.metrics_port}: {e}", file=sys.stderr)
            return 2
    sessions.STATUS_BUDGET_BYTES = args.status_budget_bytes
    sessions.AGENT_TLS = creds
    sessions.PROOF_KEY = proof_key
    if proof_key is not None:
        logging.getLogger("consortium.operator").info("fraud proofs are signed with the key %s",
                                                      proof_key.public_key_text)
    else:
        logging.getLogger("consortium.operator").warning(
            "no proof key (--proof-key, CONSORTIUM_PROOF_KEY_PEM): each session signs its fraud proofs with a "
            "key of its own")

    @kopf.on.startup()
    def configure(settings: kopf.OperatorSettings, **_):
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="consortium.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="consortium.io", key="last-handled-configuration")
        settings.posting.level = logging.WARNING  # our own Events say what happened; kopf's would repeat it
        settings.watching.server_timeout = 60
        settings.networking.request_timeout = 90

    ns_env = [x for x in os.environ.get("CONSORTIUM_WATCH_NAMESPACES", "").split(",") if x]
    namespaces = args.namespace or ns_env
    if namespaces and not _existing(namespaces):
        logging.getLogger("consortium.operator").warning(
            "none of the namespaces to watch (%s) exists yet: kopf watches nothing, sessions nor certificate "
            "requests, until one does", ", ".join(namespaces))
    if args.leader_elect:
        from consortium_operator import leadership

        leadership.lead(args.agent_namespace, lease_s=args.leader_lease_seconds, renew_s=args.leader_renew_seconds)
    try:
        kopf.run(standalone=True, namespaces=namespaces, clusterwide=not namespaces,
                 liveness_endpoint=args.liveness)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
