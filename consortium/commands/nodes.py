"""`consortium nodes`: the ComputeNodes as an admin judges them, and the admin's three decisions.

    consortium nodes                                  # one line per node: approved, ready, quarantined, records
    consortium nodes approve NODE...                  # placement may use them
    consortium nodes quarantine NODE... --reason TEXT # placement skips them; running sessions drop them
    consortium nodes release NODE... --reason TEXT    # lift a quarantine (the operator's or an admin's)

A quarantine is the ComputeNode's condition Quarantined, which the operator sets when a node fails
its audits; lifting it by hand meant patching a list inside the status subresource. The records
(`auditRecord`, `verifierRecord`) stay as they are: they are the node's history, not its sentence.
Each decision is also an Event on the node (namespace default, where cluster-scoped objects' go).
"""
from __future__ import annotations

import argparse
import json
import sys

ACTIONS = ("list", "approve", "quarantine", "release")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", default="list", metavar="{list,approve,quarantine,release}",
                        help="what to do (default: list; `consortium nodes NODE...` lists those)")
    parser.add_argument("nodes", nargs="*", metavar="NODE", help="the ComputeNodes (list: all when none)")
    parser.add_argument("--reason", help="why (quarantine, release): kept in the condition and the Event")
    parser.add_argument("--json", action="store_true", help="list: the rows as JSON")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, else ~/.kube/config)")


def rows(nodes: list[dict], assignments: list[dict], sessions: list[dict]) -> list[dict]:
    """One row per node: its state, its records, and the stages it holds in sessions still running."""
    from consortium import follow, kube

    running = {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in sessions
               if (s.get("status") or {}).get("phase") not in follow.FINAL_PHASES}
    out = []
    for n in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        name, spec, st = n["metadata"]["name"], n.get("spec") or {}, n.get("status") or {}
        q = kube.condition(st.get("conditions"), "Quarantined") or {}
        work, verdicts = st.get("auditRecord") or {}, st.get("verifierRecord") or {}
        out.append({
            "name": name, "backend": st.get("backend") or "-",
            "accelerator": (spec.get("labels") or {}).get("consortium.io/accelerator", "-"),
            "approved": bool(spec.get("approved")), "ready": kube.condition_true(n, "Ready"),
            "memoryBytes": int(spec.get("memoryBytes") or 0),
            "quarantined": q.get("status") == "True", "quarantineReason": q.get("message") if q.get("status") == "True" else None,
            "audits": int(work.get("audits", 0)), "mismatches": int(work.get("mismatches", 0)),
            "frauds": int(work.get("frauds", 0)), "verdicts": int(verdicts.get("verdicts", 0)),
            "overruled": int(verdicts.get("overruled", 0)),
            "stages": sum(1 for a in assignments if a["spec"].get("nodeName") == name
                          and (a["metadata"]["namespace"], a["spec"].get("session")) in running),
            "llamaCpp": ((st.get("llamaCpp") or {}).get("commit") or "-")[:10]})
    return out


def table(rs: list[dict]) -> list[str]:
    head = ("NAME", "BACKEND", "ACCEL", "APPROVED", "READY", "QUARANTINED", "MEMORY", "STAGES", "WORK A/M/F",
            "VERDICTS/OVERRULED", "LLAMA.CPP")
    lines = [[r["name"], r["backend"], r["accelerator"], "yes" if r["approved"] else "no", "yes" if r["ready"] else "no",
              "yes" if r["quarantined"] else "no",
              f"{r['memoryBytes'] / (1 << 30):.1f}Gi" if r["memoryBytes"] else "-",   # what placement and auto splits go by
              str(r["stages"]), f"{r['audits']}/{r['mismatches']}/{r['frauds']}",
              f"{r['verdicts']}/{r['overruled']}", r["llamaCpp"]] for r in rs]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *lines]]
    out += [f"{r['name']} is quarantined: {r['quarantineReason']}" for r in rs if r["quarantined"]]
    return out


def run(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException

    from consortium import client, kube
    from consortium import resources as r

    if args.action not in ACTIONS:   # a node's name: list it
        args.nodes, args.action = [args.action, *args.nodes], "list"
    if args.action != "list" and not args.nodes:
        print(f"consortium nodes {args.action}: name the nodes", file=sys.stderr)
        return 2
    if args.action in ("quarantine", "release") and not args.reason:
        print(f"consortium nodes {args.action}: say why (--reason): the condition and the Event keep it", file=sys.stderr)
        return 2
    try:
        kube.load_config(args.kubeconfig)
        api = kube.api()
        if args.action == "list":
            nodes = api.list_cluster_custom_object(r.GROUP, r.VERSION, "computenodes")["items"]
            if args.nodes:
                nodes = [n for n in nodes if n["metadata"]["name"] in args.nodes]
            rs = rows(nodes, api.list_cluster_custom_object(r.GROUP, r.VERSION, "stageassignments")["items"],
                      api.list_cluster_custom_object(r.GROUP, r.VERSION, "inferencesessions")["items"])
            print(json.dumps(rs, indent=2) if args.json else "\n".join(table(rs) if rs else ["no ComputeNodes"]))
            return 0
        for name in args.nodes:
            print(_decide(api, name, args.action, args.reason))
    except ApiException as e:
        print(f"consortium nodes {args.action}: the API server answered {e.status} {e.reason}: {client.refusal(e)}",
              file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - kubeconfig missing or unreadable, server unreachable
        print(kube.unreachable(e), file=sys.stderr)
        return 2
    return 0


def _decide(api, name: str, action: str, reason: str | None) -> str:
    """Approve, quarantine or release one node; the line that says what changed."""
    from consortium import kube
    from consortium import resources as r

    get = lambda: api.get_cluster_custom_object(r.GROUP, r.VERSION, "computenodes", name)  # noqa: E731
    if action == "approve":
        node = api.patch_cluster_custom_object(r.GROUP, r.VERSION, "computenodes", name, {"spec": {"approved": True}})
        kube.event(node, "Approved", "approved by an admin", component="consortium-admin")
        return f"{name}: approved"
    quarantine = action == "quarantine"
    node = kube.update_status(
        get, lambda b: api.patch_cluster_custom_object_status(r.GROUP, r.VERSION, "computenodes", name, b),
        lambda status: {**status, "conditions": kube.with_condition(
            status.get("conditions"), "Quarantined", quarantine,
            "QuarantinedByAdmin" if quarantine else "ReleasedByAdmin", reason)})
    kube.event(node, "NodeQuarantined" if quarantine else "NodeReleased", f"{name}: {action}d by an admin: {reason}",
               type_="Warning" if quarantine else "Normal", component="consortium-admin")
    return (f"{name}: quarantined ({reason}); placement skips it and running sessions drop it" if quarantine else
            f"{name}: released ({reason}); placement may use it again")
