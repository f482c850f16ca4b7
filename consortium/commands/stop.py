"""`consortium stop SESSION`: end a session's generation after the token in hand; it completes with
the tokens it has, their Receipts and audits (report.stopped: stop_requested)."""
from __future__ import annotations

import argparse
import io
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("session", help="the InferenceSession's name")
    parser.add_argument("-n", "--namespace", default="default", help="its namespace (default: default)")
    parser.add_argument("--reason", default="stopped with consortium stop",
                        help="why, kept in the session's report and its Stopped Event")
    parser.add_argument("--wait", action="store_true", help="wait for the session to end and print its outcome")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S", help="with --wait: give up after S seconds (exit 3)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, else ~/.kube/config)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 once asked (with --wait: once ended), 2 not found or no API server, 3 timed out."""
    from kubernetes.client.exceptions import ApiException

    from consortium import client, follow, kube
    from consortium import resources as r
    from consortium.commands.follow import follow_session

    where = f"inferencesession {args.namespace}/{args.session}"
    try:
        kube.load_config(args.kubeconfig)
        api = kube.api()
        now = api.get_namespaced_custom_object(r.GROUP, r.VERSION, args.namespace, "inferencesessions", args.session)
        st = now.get("status") or {}
        if st.get("phase") in follow.FINAL_PHASES:
            print(f"{where} already {st['phase']} with {len(st.get('tokens') or [])} tokens: nothing to stop",
                  file=sys.stderr)
            return 0
        client.request_stop(api, args.namespace, args.session, args.reason)
    except ApiException as e:
        print(f"cannot stop the session: {kube.session_unread(e, args.namespace, args.session)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - kubeconfig missing or unreadable, server unreachable
        print(kube.unreachable(e), file=sys.stderr)
        return 2
    print(f"{where}: stop requested at token {len(st.get('tokens') or [])} ({st.get('phase') or 'Pending'}); "
          f"the operator ends it after the token in hand", file=sys.stderr)
    if not args.wait:
        return 0
    # Its outcome, not its text; ended either way (Completed, or Failed before it began), it stopped.
    done = follow_session(args.namespace, args.session, None, args.timeout, api=api, out=io.StringIO())
    return 0 if done in (0, 1) else done
