"""`consortium certs DIR NAME...`: a CA in DIR (made on first use) and mutual-TLS certificates for
node agents (each names its node) and for the driver/operator (`--driver`, with the operator's
fraud-proof key)."""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="where the CA lives (ca.crt, ca.key) and each certificate goes (DIR/NAME/)")
    p.add_argument("names", nargs="*", help="node names (the ComputeNode names) to issue agent certificates for")
    p.add_argument("--driver", action="store_true",
                   help="also issue the driver's client certificate (the operator's, DIR/consortium-driver/), "
                        "beside the key with which the operator signs fraud proofs (proof.pem, made once)")
    p.add_argument("--days", type=int, default=365, help="validity of the new certificates (default 365)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from consortium import tls

    if not args.names and not args.driver:
        print("error: name at least one node, or pass --driver", file=sys.stderr)
        return 2
    if args.days < 1:
        print("error: --days must be at least 1", file=sys.stderr)
        return 2
    d = Path(args.dir)
    try:
        if (d / "ca.crt").exists() or (d / "ca.key").exists():
            ca = tls.CertificateAuthority.load(d)
        else:
            ca = tls.CertificateAuthority.create()
            ca.save(d)
            print(f"new CA: {d / 'ca.crt'} (keep {d / 'ca.key'} offline)")
        issued = [(n, ca.issue(n, days=args.days)) for n in args.names]
        if args.driver:
            issued.append((tls.DRIVER_NAME, ca.issue(tls.DRIVER_NAME, server=False, days=args.days)))
    except tls.TLSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, (cert, key) in issued:
        paths = tls.Credentials(cert, key, ca.cert_pem).write(d / name)
        print(f"{name}: --tls-cert {paths['cert']} --tls-key {paths['key']} --tls-ca {paths['ca']}")
    if args.driver:
        from node_agent.identity import NodeIdentity

        proof = d / tls.DRIVER_NAME / "proof.pem"
        ident = NodeIdentity.load_or_create(proof, "consortium-operator")   # kept: proofs stay checkable
        print(f"fraud proofs: --proof-key {proof} (public key {ident.public_key_text})")
        print(f"operator Secret: kubectl -n consortium-system create secret generic consortium-operator-tls "
              f"--from-file={d / tls.DRIVER_NAME}")
        print(f"  or, for the chart's tls.issuer operator (the operator signs the agents' certificates): "
              f"kubectl -n consortium-system create secret generic consortium-operator-tls --from-file={d / 'ca.crt'} "
              f"--from-file={d / 'ca.key'} --from-file={proof}")
    return 0
