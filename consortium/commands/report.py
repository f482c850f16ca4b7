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
    from consortium import session_report
    from consortium.commands.verify_receipts import session_input

    got = session_input(args)
    if isinstance(got, int):
        return got
    objects, _ = got
    r = session_report.build(*objects)
    out = Path(args.out or f"report-{objects[0]['metadata']['name']}")
    written = session_report.write(r, out)
    print(session_report.outcome(r))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0
