"""`consortium archive SESSION`: a session's evidence in one file, checked by `consortium
verify-receipts --archive` with no API server (the session, its Receipts, its nodes' keys)."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("session", help="the InferenceSession's name")
    parser.add_argument("-n", "--namespace", default="default", help="its namespace (default: default)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, else ~/.kube/config)")
    parser.add_argument("-o", "--out", metavar="FILE",
                        help="where to write it (default NAMESPACE.SESSION.UID8.json.gz here; "
                             "compressed when the name ends in .gz)")


def run(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException

    from consortium import archive, kube

    try:
        kube.load_config(args.kubeconfig)
        doc = archive.collect(kube.api(), args.namespace, args.session)
    except ApiException as e:
        print(f"cannot archive the session: {kube.session_unread(e, args.namespace, args.session)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - kubeconfig missing or unreadable, server unreachable
        print(kube.unreachable(e), file=sys.stderr)
        return 2
    out = args.out or archive.file_name(doc)
    try:
        size = archive.write(doc, out)
    except OSError as e:
        print(f"cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(archive.describe(doc, out, size))
    for line in archive.key_lines(doc)[1:]:
        print(line, file=sys.stderr)
    return 0

