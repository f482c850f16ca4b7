"""`consortium verify-receipts SESSION`: re-check a session's Receipts from the API alone."""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("session", help="the InferenceSession's name")
    parser.add_argument("-n", "--namespace", default="default", help="its namespace (default: default)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, else ~/.kube/config)")
    parser.add_argument("--json", metavar="OUT", help="also write the result as JSON ('-' for stdout alone)")


def run(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException

    from consortium import kube, receipt_check
    from consortium import resources as r

    try:
        kube.load_config(args.kubeconfig)
        api = kube.api()
        session = api.get_namespaced_custom_object(r.GROUP, r.VERSION, args.namespace, "inferencesessions",
                                                   args.session)
        receipts = api.list_namespaced_custom_object(r.GROUP, r.VERSION, args.namespace, "receipts",
                                                     label_selector=f"{r.GROUP}/session={args.session}")["items"]
        nodes = api.list_cluster_custom_object(r.GROUP, r.VERSION, "computenodes")["items"]
    except ApiException as e:
        what = f"inferencesession {args.namespace}/{args.session} not found" if e.status == 404 else \
            f"the API server answered {e.status} {e.reason}"
        print(f"cannot read the session's receipts: {what}", file=sys.stderr)
        return 2
    except Exception as e:  # kubeconfig missing or unreadable, server unreachable
        print(f"cannot reach the API server: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    res = receipt_check.check(session, receipts, nodes)
    if args.json:
        text = json.dumps(res, indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
            return 0 if res["ok"] else 1
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text)
    print("\n".join(receipt_check.lines(res)))
    return 0 if res["ok"] else 1
