"""`consortium follow SESSION`: stream a session's text as it is generated, and say what happens."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("session", help="the InferenceSession's name")
    parser.add_argument("-n", "--namespace", default="default", help="its namespace (default: default)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, else ~/.kube/config)")
    parser.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds (exit 3)")


def run(args: argparse.Namespace) -> int:
    return follow_session(args.namespace, args.session, args.kubeconfig, args.timeout)


def follow_session(namespace: str, name: str, kubeconfig: str | None, timeout_s: float | None,
                   api=None, out=None) -> int:
    """The text to stdout, events and the outcome to stderr. Exit 0 Completed, 1 Failed or deleted,
    2 not found or no API server, 3 timed out."""
    from kubernetes.client.exceptions import ApiException

    from consortium import follow, kube

    view = follow.SessionView(out or sys.stdout, sys.stderr)
    try:
        if api is None:
            kube.load_config(kubeconfig)
        follow.follow(namespace, name, view, timeout_s=timeout_s, api=api)
    except ApiException as e:
        print(f"cannot follow the session: {kube.session_unread(e, namespace, name)}", file=sys.stderr)
        return 2
    except follow.SessionGone as e:
        print(str(e), file=sys.stderr)
        return 1
    except TimeoutError as e:
        print(str(e), file=sys.stderr)
        return 3
    except Exception as e:  # noqa: BLE001 - kubeconfig missing or unreadable, server unreachable
        print(kube.unreachable(e), file=sys.stderr)
        return 2
    return 0 if view.phase == "Completed" else 1
