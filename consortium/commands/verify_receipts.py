"""`consortium verify-receipts SESSION`: re-check a session's Receipts from the API alone, or from
an archive (`--archive FILE`, written by `consortium archive` or `consortium prune`) with no API."""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("session", nargs="?", help="the InferenceSession's name (not with --archive)")
    parser.add_argument("-n", "--namespace", default="default", help="its namespace (default: default)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, else ~/.kube/config)")
    parser.add_argument("--archive", metavar="FILE",
                        help="check a session archive instead, with the node keys it holds; no API server needed")
    parser.add_argument("--json", metavar="OUT", help="also write the result as JSON ('-' for stdout alone)")


def run(args: argparse.Namespace) -> int:
    from consortium import archive, receipt_check

    got = session_input(args)
    if isinstance(got, int):
        return got
    objects, doc = got
    res = archive.check(doc) if doc else receipt_check.check(*objects)
    preface = archive.key_lines(doc) if doc else []
    if args.json:
        text = json.dumps(res, indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
            return 0 if res["ok"] else 1
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text)
    print("\n".join(preface + receipt_check.lines(res)))
    return 0 if res["ok"] else 1


def session_input(args: argparse.Namespace):
    """((session, receipts, nodes), archive or None) for the SESSION or the --archive FILE a command
    names (verify-receipts, report), or the exit code after saying why not."""
    from consortium import archive

    if bool(args.archive) == bool(args.session):
        print("name a session, or an archive with --archive (not both)", file=sys.stderr)
        return 2
    if args.archive:
        try:
            doc = archive.read(args.archive)
        except archive.ArchiveError as e:
            print(str(e), file=sys.stderr)
            return 2
        return (doc["session"], doc["receipts"], doc["computeNodes"]), doc
    read = session_objects(args)
    return read if isinstance(read, int) else (read, None)


def session_objects(args: argparse.Namespace):
    """(session, receipts, nodes) from the API, or the exit code after saying why not."""
    from kubernetes.client.exceptions import ApiException

    from consortium import kube
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
        print(f"cannot read the session's receipts: {kube.session_unread(e, args.namespace, args.session)}",
              file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - kubeconfig missing or unreadable, server unreachable
        print(kube.unreachable(e), file=sys.stderr)
        return 2
    return session, receipts, nodes
