"""`node-agent`: the daemon each machine runs; serves stages to session drivers over gRPC."""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading

from consortium import tls


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def memory_size(text: str) -> int:
    """Bytes from '12GiB', '512M', '8g' or a plain number of bytes (binary units either way)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"cannot read memory size {text!r}: write it as e.g. 12GiB, 512MiB "
                                         f"or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="node-agent", description=__doc__.splitlines()[0])
    env = os.environ.get
    # In a pod the chart sets CONSORTIUM_AGENT_PORT and CONSORTIUM_IDENTITY_DIR (a hostPath, so the key
    # outlives the pod); flags win over them.
    port = env("CONSORTIUM_AGENT_PORT")
    p.add_argument("--listen", default=f"0.0.0.0:{port}" if port else "127.0.0.1:50051",
                   help="host:port to serve on (port 0: any free port; default 0.0.0.0:$CONSORTIUM_AGENT_PORT "
                        "if set, else 127.0.0.1:50051)")
    data_port = env("CONSORTIUM_DATA_PORT")   # the chart's agent.dataPort; "0" there means no lane
    p.add_argument("--data-port", type=int, default=int(data_port) if data_port and data_port != "0" else 0,
                   help="port of the data lane, Forward steps on a plain TLS socket beside the gRPC port "
                        "(default $CONSORTIUM_DATA_PORT, else 0: any free port; drivers learn it from LoadStage)")
    p.add_argument("--no-data-lane", action="store_true", default=data_port == "0",
                   help="no data lane: drivers send Forward steps as gRPC calls (default when "
                        "CONSORTIUM_DATA_PORT is 0)")
    p.add_argument("--metrics-port", type=int, default=env("CONSORTIUM_METRICS_PORT") or "0", metavar="PORT",
                   help="serve Prometheus metrics at :PORT/metrics, on --listen's host (default "
                        "$CONSORTIUM_METRICS_PORT; 0: off)")
    identity_dir = env("CONSORTIUM_IDENTITY_DIR")
    p.add_argument("--key-file", required=not identity_dir,
                   default=os.path.join(identity_dir, "node.pem") if identity_dir else None,
                   help="the node's Ed25519 key (PKCS#8 PEM, mode 0600; created if missing; default "
                        "$CONSORTIUM_IDENTITY_DIR/node.pem)")
    p.add_argument("--node-id", help="node id (default: derived from the public key)")
    p.add_argument("--labels", default="", help="comma-separated key=value labels, e.g. role=metal,consortium.io/node=N2")
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads per stage (default: all cores)")
    p.add_argument("--audit-threads", type=int, default=0,
                   help="llama.cpp threads of audit replays (default: the cores --threads leaves free, at least 1)")
    p.add_argument("--audit-stall-s", type=float, default=120.0, metavar="S",
                   help="kill the audit process when it has advanced by no batch for S seconds while an audit "
                        "waits (the audit is refused INTERNAL, the next one starts a new process; default 120)")
    p.add_argument("--memory", type=memory_size, default=env("CONSORTIUM_MEMORY") or None, metavar="SIZE",
                   help="the memory this node offers its stages, e.g. 12GiB (on a GPU: the VRAM it may use); the "
                        "operator places stages within it and splits 'auto' layers in proportion to it (default "
                        "$CONSORTIUM_MEMORY, else the machine's physical memory)")
    p.add_argument("--ctx", type=int, default=2048, help="positions each session (and each audit replay) can hold on a loaded layer range")
    p.add_argument("--no-repack", action="store_true",
                   help="turn off llama.cpp's CPU weight repacking: other kernels, honest float differences")
    p.add_argument("--fault", help="cheat on purpose, for tests: skip-layer, cheap-quant, noise-<scale>, replay, random, "
                        "wrong-token (final stage)")
    p.add_argument("--audit-fault", metavar="FAULT",
                   help="lie as a verifier on purpose, for tests: the rows audits recompute get noise-<scale>, "
                        "replay or random")
    k = p.add_argument_group("control plane", "register a ComputeNode and renew a Lease (bare: --kubeconfig; "
                             "in the cluster: the pod's ServiceAccount, labels from the Node CONSORTIUM_NODE_NAME)")
    k.add_argument("--kubeconfig", help="bare mode: kubeconfig of the agent ServiceAccount")
    k.add_argument("--name", help="ComputeNode name (default: CONSORTIUM_NODE_NAME, else the node id)")
    k.add_argument("--endpoint", help="host:port other machines reach this agent at (default: the listen address; "
                                      "in the cluster CONSORTIUM_POD_IP:port)")
    k.add_argument("--namespace", default=os.environ.get("CONSORTIUM_NAMESPACE", "consortium-system"),
                   help="namespace of the heartbeat Lease (the chart's release namespace)")
    k.add_argument("--lease-seconds", type=int, default=10, help="Lease duration; renewed every fifth of it")
    k.add_argument("--credentials-warn-hours", type=float, default=24.0, metavar="H",
                   help="bare mode: the ComputeNode's CredentialsExpiring turns True, and the log warns hourly, "
                        "once the kubeconfig's token has less than H hours left (default 24); the file is "
                        "loaded again whenever it changes")
    p.add_argument("--port-file", help="write the bound port here once serving (for --listen with port 0)")
    tls.add_arguments(p, "agent")
    return p


def parse_labels(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"label {item!r} is not key=value")
        out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s node-agent %(message)s")
    from node_agent import faults, server
    from node_agent.identity import NodeIdentity

    try:
        labels = parse_labels(args.labels)
        fault = faults.parse_fault(args.fault).name if args.fault else None
        audit_fault = faults.parse_fault(args.audit_fault) if args.audit_fault else None
        if audit_fault is not None and not audit_fault.transforms_output:
            raise ValueError(f"--audit-fault {audit_fault.name}: only noise-<scale>, replay and random change an "
                             "audit's rows")
        if not args.audit_stall_s > 0:   # NaN included
            raise ValueError(f"--audit-stall-s must be a positive number of seconds, not {args.audit_stall_s}")
        if not args.credentials_warn_hours >= 0:
            raise ValueError(f"--credentials-warn-hours must be 0 or more hours, not {args.credentials_warn_hours}")
        creds = tls.from_args(args)   # TLSError is a ValueError
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    identity = NodeIdentity.load_or_create(args.key_file, args.node_id)
    if args.threads < 0 or args.audit_threads < 0:
        print("error: --threads and --audit-threads are 0 (automatic) or a number of threads", file=sys.stderr)
        return 2
    config = server.AgentConfig(node_id=identity.node_id, labels=labels, threads=args.threads,
                                audit_threads=args.audit_threads, n_ctx=args.ctx, repack=not args.no_repack,
                                fault=fault, audit_fault=audit_fault.name if audit_fault else None,
                                audit_stall_s=args.audit_stall_s)
    node_name = os.environ.get("CONSORTIUM_NODE_NAME") or os.environ.get("NODE_NAME")
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not args.kubeconfig
    name = args.name or node_name or identity.node_id   # the ComputeNode's, and the certificate's
    credentials = None
    if args.kubeconfig or in_cluster:
        from consortium import kube

        kube.load_config(args.kubeconfig)
    if args.kubeconfig:
        from node_agent.credentials import Kubeconfig

        credentials = Kubeconfig(args.kubeconfig, warn_before_s=args.credentials_warn_hours * 3600)
        logging.info("control plane: kubeconfig %s, %s", args.kubeconfig, credentials.describe())
    if args.tls_from_cluster:
        if not (args.kubeconfig or in_cluster):
            print("error: --tls-from-cluster asks the cluster: give --kubeconfig (or run in the cluster)", file=sys.stderr)
            return 2
        from node_agent import certificate

        try:
            creds = tls.Rotating(certificate.from_cluster(args.tls_from_cluster, name))
        except tls.TLSError as e:
            print(f"error: --tls-from-cluster: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001 - the API server refused or could not be reached
            hint = (" (the agents may ask for certificates only where the chart has tls.issuer operator)"
                    if kube.is_status(e, 403) else "")
            print(f"error: --tls-from-cluster: asking the API server for a certificate failed: {kube.reason(e)}{hint}",
                  file=sys.stderr)
            return 2
    if creds is not None and args.name and creds.name != args.name:
        print(f"error: the TLS certificate names {creds.name!r}, not this node ({args.name!r})", file=sys.stderr)
        return 2
    srv, service, port = server.serve(identity, args.listen, config, tls=creds,
                                      data_port=None if args.no_data_lane else args.data_port)
    service.audits.start()
    host = args.listen.rsplit(":", 1)[0]
    if args.metrics_port:
        from consortium import metrics
        from node_agent.metrics import AgentCollector

        try:
            metrics.serve([AgentCollector(service, credentials)], args.metrics_port, host.strip("[]"))
        except OSError as e:
            print(f"error: --metrics-port {args.metrics_port}: {e}", file=sys.stderr)
            srv.stop(grace=None)
            return 2
    logging.info("node %s serving on %s:%d, data lane %s (%s, backend %s%s%s%s)", identity.node_id, host, port,
                 service.data_port or "off",
                 f"mutual TLS as {creds.name}" if creds else "PLAINTEXT", service.backend,
                 ", repacking off" if args.no_repack else "", f", FAULT {fault}" if fault else "",
                 f", LYING AUDITS {audit_fault.name}" if audit_fault else "")
    renewer = certificate.Renewer(creds, args.tls_from_cluster, name).start() if args.tls_from_cluster else None
    registrar = None
    if args.kubeconfig or in_cluster:
        from node_agent import registration

        if in_cluster and node_name:
            labels = {**registration.node_labels(node_name), **labels}  # the Node's labels, flags on top
        pod_ip = os.environ.get("CONSORTIUM_POD_IP")
        endpoint = args.endpoint or (f"{pod_ip}:{port}" if in_cluster and pod_ip else f"{host}:{port}")
        registrar = registration.Registrar(service, name=name,
                                           endpoint=endpoint, labels=labels, namespace=args.namespace,
                                           lease_seconds=args.lease_seconds, memory_bytes=args.memory,
                                           renew_seconds=max(0.5, args.lease_seconds / 5), credentials=credentials)
        registrar.start()
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(f"{port}\n")
        os.replace(args.port_file + ".tmp", args.port_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    if renewer is not None:
        renewer.stop()
    if registrar is not None:
        registrar.stop()
    srv.stop(grace=2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
