"""`consortium ask PROMPT`: create an InferenceSession and follow it to its end.

The session is the default model split in three by default (any approved nodes take the stages), or
the one a manifest describes (`--from`), with the prompt given here in place of its own. Its text
streams to stdout as `consortium follow` shows it; `--detach` only creates it and prints its name.
"""
from __future__ import annotations

import argparse
import sys

from consortium import client


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the user's prompt (wrapped in the model's chat template); "
                        "optional with --from, whose prompt or messages are used then")
    parser.add_argument("--from", dest="manifest", metavar="FILE",
                        help="an InferenceSession manifest to start from (model, stages, audit, ...)")
    parser.add_argument("--name", help="the session's name (default: generated, ask-xxxxx)")
    parser.add_argument("--max-tokens", type=int, help="tokens to generate (default: the manifest's, else 64)")
    parser.add_argument("--stop", action="append", metavar="TEXT",
                        help="end generation once the text holds TEXT (repeat for up to 4)")
    parser.add_argument("--layers", metavar="RANGES",
                        help="one stage per range, any approved node each (default without --from: "
                             f"{client.DEFAULT_LAYERS})")
    parser.add_argument("--stages", type=int, metavar="N",
                        help="N stages, any approved node each, the layers split by the nodes' memory")
    client.add_model_arguments(parser)
    parser.add_argument("-n", "--namespace", default="default", help="where to create it (default: default)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, else ~/.kube/config)")
    parser.add_argument("--timeout", type=float, metavar="S", help="stop following after S seconds (exit 3)")
    parser.add_argument("--detach", action="store_true", help="create the session, print its name, do not follow")


def run(args: argparse.Namespace) -> int:
    import yaml
    from kubernetes.client.exceptions import ApiException

    from consortium import kube
    from consortium import resources as r
    from consortium.commands.follow import follow_session

    try:
        body = client.session_body(client.read_template(args.manifest), prompt=args.prompt, name=args.name, max_tokens=args.max_tokens,
                                   layers=args.layers, stages=args.stages, model=client.model_from_args(args),
                                   stop_sequences=args.stop)
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"consortium ask: {e}", file=sys.stderr)
        return 2
    try:
        kube.load_config(args.kubeconfig)
        api = kube.api()
        made = api.create_namespaced_custom_object(r.GROUP, r.VERSION, args.namespace, "inferencesessions", body)
    except ApiException as e:
        print(f"the API server refused the session: {e.status} {e.reason}: {client.refusal(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - kubeconfig missing or unreadable, server unreachable
        print(kube.unreachable(e), file=sys.stderr)
        return 2
    name = made["metadata"]["name"]
    if args.detach:
        print(name)
        return 0
    print(f"inferencesession {args.namespace}/{name} created; following it (Ctrl-C stops following, "
          f"not the session: consortium stop {name} -n {args.namespace} does)", file=sys.stderr)
    return follow_session(args.namespace, name, None, args.timeout, api=api)

