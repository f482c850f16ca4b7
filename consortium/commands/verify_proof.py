"""`consortium verify-proof FILE`: re-check a fraud proof independently of whoever wrote it."""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a fraud proof JSON file ('-' for stdin)")
    parser.add_argument("--verifier-key", metavar="KEY",
                        help="the base64 Ed25519 public key the session's proofs must be signed with, as "
                             "published in its status: kubectl get inferencesession NAME -o "
                             "jsonpath='{.status.proofKey}'")


def run(args: argparse.Namespace) -> int:
    from consortium.verification import proofs, signing

    try:
        text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
        proof = proofs.proof_from_json(json.loads(text))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"cannot read a fraud proof from {args.file}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if args.verifier_key is not None:
        try:
            signing.public_key(args.verifier_key)
        except ValueError as e:
            print(f"--verifier-key is not a base64 Ed25519 public key: {e}", file=sys.stderr)
            return 2
    holds, reasons = proofs.check_proof(proof, args.verifier_key)
    print("HOLDS" if holds else "DOES NOT HOLD")
    for r in reasons:
        print(f"  {r}")
    return 0 if holds else 1
