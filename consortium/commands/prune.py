"""`consortium prune --finished-before AGE`: delete sessions that ended long enough ago, each archived
first (its Receipts and StageAssignments go with it: the session owns them)."""
from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from pathlib import Path

AGE = re.compile(r"^(\d+)([smhdw]?)$")
SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def age(text: str) -> dt.timedelta:
    m = AGE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age: a whole number with s, m, h, d or w (90s, 30m, 24h, 7d)")
    return dt.timedelta(seconds=int(m.group(1)) * SECONDS[m.group(2)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--finished-before", required=True, type=age, metavar="AGE",
                        help="prune sessions that ended (Completed or Failed) longer ago than AGE: 90s, 30m, 24h, "
                             "7d; 0 for every ended session")
    keep = parser.add_mutually_exclusive_group(required=True)
    keep.add_argument("--archive-dir", metavar="DIR",
                      help="write each session's archive here before deleting it (verify-receipts --archive reads it)")
    keep.add_argument("--no-archive", action="store_true", help="delete without keeping the evidence")
    parser.add_argument("-n", "--namespace", default="default", help="the namespace (default: default)")
    parser.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    parser.add_argument("-l", "--selector", metavar="LABELS",
                        help="only sessions with these labels, e.g. consortium.io/created-by=openai-api "
                             "(the OpenAI-compatible endpoint's)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be pruned, change nothing")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, else ~/.kube/config)")


def ended_at(session: dict) -> dt.datetime | None:
    """When a session ended: status.finishedAt, else when its Ready condition last changed; None while
    it runs."""
    from consortium import follow, kube

    st = session.get("status") or {}
    if st.get("phase") not in follow.FINAL_PHASES:
        return None
    ready = kube.condition(st.get("conditions"), "Ready") or {}
    return kube.parse_time(st.get("finishedAt") or ready.get("lastTransitionTime"))


def run(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException

    from consortium import kube
    from consortium import resources as r

    if args.archive_dir and not args.dry_run:
        Path(args.archive_dir).mkdir(parents=True, exist_ok=True)
    try:
        kube.load_config(args.kubeconfig)
        api = kube.api()
        listing = (api.list_cluster_custom_object(r.GROUP, r.VERSION, "inferencesessions", label_selector=args.selector or "")
                   if args.all_namespaces else
                   api.list_namespaced_custom_object(r.GROUP, r.VERSION, args.namespace, "inferencesessions",
                                                     label_selector=args.selector or ""))
    except ApiException as e:
        print(f"cannot list sessions: the API server answered {e.status} {e.reason}: {e.body}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - kubeconfig missing or unreadable, server unreachable
        print(kube.unreachable(e), file=sys.stderr)
        return 2
    cutoff = kube.now() - args.finished_before
    sessions = listing["items"]
    due = sorted((s for s in sessions if (ended_at(s) or cutoff) < cutoff), key=ended_at)
    where = "all namespaces" if args.all_namespaces else f"namespace {args.namespace}"
    print(f"{len(due)} of {len(sessions)} sessions in {where}{' labeled ' + args.selector if args.selector else ''} "
          f"ended before {kube.timestamp(cutoff)}" + (" (dry run: nothing changes)" if args.dry_run else ""),
          file=sys.stderr)
    failed = 0
    for s in due:
        try:
            print(_prune(api, s, args))
        except Exception as e:  # noqa: BLE001 - one session's failure leaves the others to go on
            failed += 1
            md = s["metadata"]
            print(f"{md['namespace']}/{md['name']}: NOT pruned: {kube.reason(e)}", file=sys.stderr)
    if due:
        print(f"{len(due) - failed} of {len(due)} sessions {'would be ' if args.dry_run else ''}pruned"
              + (f", {failed} failed (kept)" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def _prune(api, session: dict, args: argparse.Namespace) -> str:
    """Archive (unless told not to), then delete this session and only this one: a namesake made since
    it was listed has another uid, and the delete's precondition refuses it."""
    from kubernetes import client

    from consortium import archive, kube
    from consortium import resources as r

    md = session["metadata"]
    ago = kube.now() - ended_at(session)
    line = f"{md['namespace']}/{md['name']}: {session['status']['phase']} {_ago(ago)} ago"
    if args.archive_dir:
        doc = archive.collect(api, md["namespace"], md["name"])
        if doc["session"]["metadata"]["uid"] != md["uid"]:
            raise RuntimeError("deleted and made again since it was listed: left for the next run")
        path = Path(args.archive_dir) / archive.file_name(doc)
        if args.dry_run:
            return f"{line}, {len(doc['receipts'])} receipts: would be archived to {path} and deleted"
        size = archive.write(doc, path)
        if len(archive.read(path)["receipts"]) != len(doc["receipts"]):   # what was written reads back whole
            raise RuntimeError(f"{path} did not read back whole")
        line = archive.describe(doc, str(path), size, ended=f"{_ago(ago)} ago") + ", deleted"
    elif args.dry_run:
        return f"{line}: would be deleted"
    else:
        line += ": deleted, not archived"
    try:
        api.delete_namespaced_custom_object(
            r.GROUP, r.VERSION, md["namespace"], "inferencesessions", md["name"],
            body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=md["uid"]),
                                        propagation_policy="Background"))
    except client.exceptions.ApiException as e:
        if e.status == 404:
            return f"{md['namespace']}/{md['name']}: already gone"
        if e.status == 409:
            raise RuntimeError("deleted and made again since it was listed: left for the next run") from None
        raise
    return line


def _ago(d: dt.timedelta) -> str:
    s = int(d.total_seconds())
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"
