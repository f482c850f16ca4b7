"""`node-agent`: the daemon each machine runs; serves stages to session drivers over gRPC."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="node-agent", description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:50051", help="host:port to serve on (port 0: any free port)")
    p.add_argument("--key-file", required=True, help="the node's Ed25519 key (PKCS#8 PEM, mode 0600; created if missing)")
    p.add_argument("--node-id", help="node id (default: derived from the public key)")
    p.add_argument("--labels", default="", help="comma-separated key=value labels, e.g. role=metal,consortium.io/node=N2")
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads per stage (default: all cores)")
    p.add_argument("--ctx", type=int, default=2048, help="KV cells per loaded layer range, shared by its sessions")
    p.add_argument("--no-repack", action="store_true",
                   help="turn off llama.cpp's CPU weight repacking: other kernels, honest float differences")
    p.add_argument("--plaintext", action="store_true",
                   help="serve without TLS (the only mode so far; mutual TLS comes later)")
    p.add_argument("--fault", help="cheat on purpose, for tests: skip-layer, cheap-quant, noise-<scale>, replay, random")
    p.add_argument("--port-file", help="write the bound port here once serving (for --listen with port 0)")
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
    if not args.plaintext:
        print("error: only --plaintext is implemented so far (mutual TLS is a later issue); pass --plaintext",
              file=sys.stderr)
        return 2
    from node_agent import faults, server
    from node_agent.identity import NodeIdentity

    try:
        labels = parse_labels(args.labels)
        fault = faults.parse_fault(args.fault).name if args.fault else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    identity = NodeIdentity.load_or_create(args.key_file, args.node_id)
    config = server.AgentConfig(node_id=identity.node_id, labels=labels, threads=args.threads, n_ctx=args.ctx,
                                repack=not args.no_repack, fault=fault)
    srv, service, port = server.serve(identity, args.listen, config)
    host = args.listen.rsplit(":", 1)[0]
    logging.info("node %s serving on %s:%d (backend %s%s%s)", identity.node_id, host, port, service.backend,
                 ", repacking off" if args.no_repack else "", f", FAULT {fault}" if fault else "")
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(f"{port}\n")
        import os
        os.replace(args.port_file + ".tmp", args.port_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    srv.stop(grace=2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
