"""`consortium report SESSION`: one session's report (summary.md, report.json, latency.png) from the
API, or from an archive with `--archive FILE`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("session", nargs="?", help="the InferenceSession's name (not with --archive)")
    parser.add_argument("-n", "--namespace", default="default", help="its namespace (default: default)")
    parser.add_argument("--archive", metavar="FILE", help="report on a session archive instead; no API server needed")
    parser.add_argument("--out", metavar="DIR", help="where to write (default: report-SESSION)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, else ~/.kube/config)")


def run(args: argparse.Namespace) -> int:
    from consortium import archive, session_report

    if bool(args.archive) == bool(args.session):
        print("name a session, or an archive with --archive (not both)", file=sys.stderr)
        return 2
    if args.archive:
        try:
            doc = archive.read(args.archive)
        except archive.ArchiveError as e:
            print(str(e), file=sys.stderr)
            return 2
        objects = doc["session"], doc["receipts"], doc["computeNodes"]
    else:
        from consortium.commands.verify_receipts import session_objects

        objects = session_objects(args)
        if isinstance(objects, int):
            return objects
    r = session_report.build(*objects)
    out = Path(args.out or f"report-{objects[0]['metadata']['name']}")
    written = session_report.write(r, out)
    print(session_report.outcome(r))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0
