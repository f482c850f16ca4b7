"""`consortium api`: an OpenAI-compatible chat endpoint; each request becomes an InferenceSession."""
from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--template", action="append", default=[], metavar="FILE",
                        help="an InferenceSession manifest that requests for its spec.model.name are made from "
                             "(model, stages, audit, receipts; its prompt is replaced); repeat for more models, "
                             "the first is the default. Without one: the default model in three stages")
    parser.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                        help="where to serve (default 127.0.0.1:8080; port 0 picks a free one)")
    parser.add_argument("-n", "--namespace", default="default", help="where sessions are made (default: default)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, else ~/.kube/config or in-cluster)")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="S",
                        help="longest answer in seconds (default 600); the session itself goes on")
    parser.add_argument("--max-tokens-cap", type=int, metavar="N",
                        help="refuse requests for more than N tokens (default: only the session schema's limit)")
    parser.add_argument("--max-concurrent", type=int, default=32, metavar="N",
                        help="requests answered at once (default 32; each is a session on the nodes); more are "
                             "refused 429 for the client to retry. 0: no limit")
    parser.add_argument("--keep-on-disconnect", action="store_true",
                        help="let a session whose client went away generate to its end (default: stop it, "
                             "which needs patch on inferencesessions)")
    parser.add_argument("--api-key", help="the bearer token clients must send (default: CONSORTIUM_API_KEY; "
                                          "none: any client that reaches the port may make sessions)")


def run(args: argparse.Namespace) -> int:
    import yaml

    from consortium import kube, openai_api

    logging.basicConfig(level=logging.INFO, format="%(asctime)s consortium-api %(message)s")
    host, _, port = args.listen.rpartition(":")
    try:
        endpoint = openai_api.Endpoint.from_files(args.template, namespace=args.namespace, timeout_s=args.timeout,
                                                  api_key=args.api_key or openai_api.api_key_from_env(),
                                                  max_tokens_cap=args.max_tokens_cap,
                                                  keep_on_disconnect=args.keep_on_disconnect,
                                                  max_concurrent=args.max_concurrent or None)
        kube.load_config(args.kubeconfig)
        srv = openai_api.serve(endpoint, host.strip("[]") or "127.0.0.1", int(port))
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"consortium api: {e}", file=sys.stderr)
        return 2
    h, p = srv.server_address[:2]
    logging.info("serving OpenAI's chat API on http://%s:%d/v1 (models: %s; sessions in namespace %s%s)", h, p,
                 ", ".join(endpoint.templates), args.namespace, "" if endpoint.api_key else "; NO API KEY")
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0
