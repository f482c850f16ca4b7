"""`consortium chat`: a conversation in the terminal, each turn an InferenceSession.

Every turn is a session of its own whose messages are the conversation so far (the system message,
then each user line and the answer it got), made from the default session or a manifest (`--from`)
and followed as `consortium follow` shows it: the answer streams to stdout, a failover or rollback is
told on stderr, and a short line after each answer gives its audits and receipts. Ctrl-C during an
answer stops that session (it completes with the text so far, which the conversation keeps); Ctrl-C
or Ctrl-D at the prompt, or `/exit`, ends the chat. The sessions are labeled
`consortium.io/created-by=consortium-chat`, for `consortium prune -l` to find.
"""
from __future__ import annotations

import argparse
import sys

from consortium import client

CREATED_BY = {"consortium.io/created-by": "consortium-chat"}
STOP_REASON = "interrupted in consortium chat"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="manifest", metavar="FILE",
                        help="an InferenceSession manifest each turn is made from (model, stages, audit, ...)")
    parser.add_argument("--system", metavar="TEXT", help="a system message to open the conversation with")
    parser.add_argument("--max-tokens", type=int, help="tokens per answer (default: the manifest's, else 64)")
    parser.add_argument("--layers", metavar="RANGES", help=f"one stage per range (default without --from: "
                                                           f"{client.DEFAULT_LAYERS})")
    parser.add_argument("--stages", type=int, metavar="N", help="N stages, the layers split by the nodes' memory")
    client.add_model_arguments(parser)
    parser.add_argument("-n", "--namespace", default="default", help="where the sessions are made (default: default)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, else ~/.kube/config)")


def _answer_view():
    """A SessionView for one answer: its text to stdout as it grows, news to stderr, and the outcome
    in one line instead of follow's block."""
    from consortium import follow

    class AnswerView(follow.SessionView):
        def _end(self):
            if self.printed and not self.printed.endswith("\n"):
                self.out.write("\n")
                self.out.flush()
            outcome, size = self.summary()[:2]
            m = self.status.get("metrics") or {}
            self._line(f"[{outcome}, {size}; audits {m.get('auditsPassed', 0)} of {m.get('audits', 0)} passed, "
                       f"{m.get('receipts', 0)} receipts]")

    return AnswerView(sys.stdout, sys.stderr, timestamps=False)


def run(args: argparse.Namespace) -> int:
    import yaml
    from kubernetes.client.exceptions import ApiException

    from consortium import follow, kube
    from consortium import resources as r

    try:
        template = client.read_template(args.manifest)
        model = client.model_from_args(args)
        # A template that is no session, or a bad stage list, is refused before the first line is read.
        client.session_body(template, prompt="-", max_tokens=args.max_tokens, layers=args.layers,
                            stages=args.stages, model=model)
        kube.load_config(args.kubeconfig)
        api = kube.api()
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"consortium chat: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - kubeconfig missing or unreadable
        print(kube.unreachable(e), file=sys.stderr)
        return 2
    history = [{"role": "system", "content": args.system}] if args.system else []
    tty = sys.stdin.isatty()
    if tty:
        print(f"chatting in namespace {args.namespace}; each answer is a session. /exit or Ctrl-D ends, Ctrl-C "
              f"stops an answer.", file=sys.stderr)
    while True:
        try:
            line = input("> " if tty else "")
        except (EOFError, KeyboardInterrupt):
            break
        if line.strip() == "/exit":
            break
        if not line.strip():
            continue
        turn = history + [{"role": "user", "content": line}]
        body = client.session_body(template, messages=turn, generate_name="chat-", max_tokens=args.max_tokens,
                                   layers=args.layers, stages=args.stages, model=model, labels=CREATED_BY)
        body["metadata"].pop("name", None)   # a session per turn, whatever the manifest is called
        body["metadata"]["generateName"] = "chat-"
        try:
            made = api.create_namespaced_custom_object(r.GROUP, r.VERSION, args.namespace, "inferencesessions", body)
        except ApiException as e:
            print(f"the API server refused the session: {e.status} {e.reason}: {client.refusal(e)}", file=sys.stderr)
            continue
        except Exception as e:  # noqa: BLE001 - the API server went away: the conversation is kept
            print(kube.unreachable(e), file=sys.stderr)
            continue
        name = made["metadata"]["name"]
        view = _answer_view()
        while True:
            try:
                follow.follow(args.namespace, name, view, api=api)
                break
            except KeyboardInterrupt:   # stop this answer, keep what it has
                try:
                    client.request_stop(api, args.namespace, name, STOP_REASON)
                except Exception as e:  # noqa: BLE001 - then the answer runs to its end
                    print(f"session {name} could not be stopped: {kube.reason(e)}", file=sys.stderr)
            except (ApiException, follow.SessionGone) as e:
                print(f"session {name}: {getattr(e, 'reason', None) or e}", file=sys.stderr)
                break
        if view.phase == "Completed":
            history = turn + [{"role": "assistant", "content": view.status.get("text") or ""}]
        else:
            print("(this turn is left out of the conversation; say it again to retry)", file=sys.stderr)
    return 0
