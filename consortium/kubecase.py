"""Test Case v1 through Kubernetes: the local control plane (when no cluster is configured), the CRDs
and the chart's RBAC, the operator and three agents as processes with their ServiceAccounts' tokens,
the sky-is-blue session, a SIGKILL of stage 1's agent at token 20, and the report of the standalone
run plus receipts_in_api (how many Receipt objects the API server holds for the session) and the
fraud proofs read back from those Receipts' status.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from consortium import kube, receipt_check, standalone, testbed, testreport
from consortium.driver.proofs import proof_file_name, recheck, write_proof_files
from consortium.driver.state import audit_records, counters_of_report, steps_of_report

SESSION = "sky-is-blue"
NAMESPACE = "default"
# The stages someone can take over, with the node the sky-is-blue selectors place there: --faulty-stage
# starts that node with --fault, --kill-stage kills it. Stage 2's node (n0) is the only coordinator,
# the backup of every stage, so a cheating or dead n0 leaves no one to take its stage over.
REPLACEABLE_STAGES = {0: "n1", 1: "n2"}
# The node --lying-verifier may name: n0 and n2 carry the verifier label, and n0 is the coordinator.
LYING_VERIFIERS = ("n2",)


def baseline(max_tokens: int, prompt: str, threads: int):
    """The single-node run the session's tokens must equal."""
    from consortium import generation
    from consortium.models import resolve_model
    from consortium.tokenizer import Tokenizer
    from node_agent.engine.pipeline import LocalPipeline
    from node_agent.engine.stage import StageConfig

    model = resolve_model(None)
    tok = Tokenizer(model)
    try:
        ids = tok.prompt_tokens(prompt)
        with LocalPipeline(model, None, StageConfig(threads=threads)) as pipe:
            return generation.generate(pipe, ids, max_tokens, is_end=tok.is_end_of_generation, detokenize=tok.decode)
    finally:
        tok.close()


def local_cluster(what: str = "Test Case v1", cluster=None):
    """`cluster` when the caller owns a running one (tests), else the local control plane of
    `consortium cluster up`, started here when it is not up: (cluster, started_here)."""
    from consortium import cluster as lc

    cl = cluster or lc.LocalCluster(lc.default_state_dir())
    configured = os.environ.get("KUBECONFIG")
    if cluster is None and configured and os.path.realpath(configured) != os.path.realpath(cl.kubeconfig):
        # (The local control plane's own kubeconfig, as `consortium cluster up` prints it, is fine.)
        raise SystemExit(f"KUBECONFIG names another cluster: running {what} on a configured cluster is not "
                         "implemented yet; unset it to use the local control plane (consortium cluster up)")
    started_here = not cl.is_ready()
    if started_here:
        cl.start(timeout=300)
    return cl, started_here


def run(opts, cluster=None, spec_overrides: dict | None = None) -> dict:
    """`cluster`: a running LocalCluster the caller owns (tests); default: the local control plane,
    stopped at the end when it was started here. `spec_overrides`: top-level fields of the session's
    spec merged one level deep (an extension's deadlines)."""
    cl, started_here = local_cluster(cluster=cluster)
    base = baseline(opts.max_tokens, opts.prompt, opts.threads)
    workdir = Path(tempfile.mkdtemp(prefix="consortium-k8s-testcase-"))
    bed = testbed.Testbed(cl, workdir, threads=opts.threads, plaintext=opts.plaintext, issuer=opts.tls_issuer)
    s = None
    try:
        bed.install()
        cl.kubectl("delete", "inferencesession", SESSION, "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
        # This run's agents have new keys, so they are new nodes: forget an earlier run's (on a control
        # plane left up), whose Quarantined condition from a faulty-worker run would keep a stage unplaced.
        cl.kubectl("delete", "computenode", *testbed.NODE_LABELS, "--ignore-not-found", "--wait=true")
        faulty_node = REPLACEABLE_STAGES[opts.faulty_stage] if opts.faulty_stage is not None else None
        liar = opts.lying_verifier.lower() if opts.lying_verifier else None
        bed.start_operator()   # first, as in a cluster: it may have to sign the agents' certificates
        for name, labels in testbed.NODE_LABELS.items():
            bed.start_agent(name, labels, (["--fault", opts.fault] if name == faulty_node else [])
                            + (["--audit-fault", opts.lie] if name == liar else []))
        bed.approve(*testbed.NODE_LABELS)
        body = testbed.sky_is_blue(opts.max_tokens, SESSION, opts.audit_probability)
        body["spec"]["audit"]["seed"] = opts.audit_seed
        body["spec"]["prompt"] = opts.prompt
        for k, v in (spec_overrides or {}).items():
            body["spec"][k] = {**body["spec"].get(k, {}), **v} if isinstance(v, dict) else v
        t0 = time.perf_counter()
        cl.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(body))
        killed = {}
        if opts.kill_stage is not None:
            victim = bed.wait_assignment(SESSION, NAMESPACE, opts.kill_stage, 300)["nodeName"]
            # Killed once it has computed its row of the step that generates token kill_at, asked of
            # the agent itself: the next step finds it gone (the report says where the failover landed;
            # a kill between computing the row and answering loses that step instead: one token early).
            at = bed.wait_token(SESSION, NAMESPACE, victim, opts.kill_stage, opts.kill_at, 600,
                                prompt_len=len(base.prompt_tokens))
            bed.kill_agent(victim)
            killed = {"node": victim, "at_token_observed": at}
        s = bed.wait_phase(SESSION, NAMESPACE, ("Completed", "Failed"), 1200)
        wall = time.perf_counter() - t0
        labeled = bed.get("receipts", namespace=NAMESPACE, selector=f"consortium.io/session={SESSION}")["items"]
        # An earlier run's may not be collected yet.
        receipts = [rc for rc in labeled if kube.owned_by(rc, s["metadata"]["uid"])]
        events = [e["reason"] for e in bed.events(NAMESPACE, SESSION)]
        sas = {i: bed.get("stageassignment", f"{SESSION}-s{i}", NAMESPACE) for i in range(3)}
        nodes = {n["metadata"]["name"]: n for n in bed.get("computenodes")["items"]}
        checked = receipt_check.check(s, labeled, list(nodes.values()))
    finally:
        bed.close()
        if started_here:
            cl.stop()
        completed = s is not None and (s.get("status") or {}).get("phase") == "Completed"
        agent_logs = standalone.settle_workdir(workdir, opts.logs_dir, keep=not completed)
    report = _report(opts, base, s, wall, receipts, checked, events, sas, nodes, killed, faulty_node, liar)
    report["agent_logs"] = agent_logs
    return report


def _report(opts, base, s, wall, receipts, checked, events, sas, nodes, killed, faulty_node=None, liar=None) -> dict:
    st = s.get("status") or {}
    drv = (st.get("report") or {}).get("driverState") or {}
    audits = audit_records(drv)
    count = {v: sum(a["verdict"] == v for a in audits) for v in ("Passed", "PassedWithinTolerance", "Mismatch", "Fraud")}
    tokens = st.get("tokens") or []
    exact = tokens == base.tokens
    diverge = next((i for i, (a, b) in enumerate(zip(base.tokens, tokens)) if a != b), None)
    counters = counters_of_report((st.get("report") or {}).get("counters"))
    per_pos: dict[tuple[int, int], int] = {}
    for rows in counters.values():
        for stage, p, f, _ in rows:
            per_pos[(stage, p)] = per_pos.get((stage, p), 0) + f
    fo = drv.get("failovers", [])
    quarantined = drv.get("quarantined", [])
    honest_audits = [a for a in audits if a["node"] != faulty_node]
    honest_bad = sum(a["verdict"] == "Fraud" for a in honest_audits)
    in_api = {n for n, c in nodes.items() if any(x["type"] == "Quarantined" and x["status"] == "True"
                                                  for x in (c.get("status") or {}).get("conditions") or [])}
    verdicts = [(r.get("status") or {}).get("verdict") for r in receipts]
    report_from_state = bool(((s.get("spec") or {}).get("audit") or {}).get("fromWindowStates"))
    report = {
        "mode": "kubernetes",
        "transport": "plaintext" if opts.plaintext else "mutual TLS" + (
            ", agents' certificates signed by the operator" if opts.tls_issuer == "operator" else ""),
        "signing": (s.get("spec") or {}).get("signing"),   # PerStep or PerWindow, as the server stored it
        "audit_from_state": report_from_state,
        "receipt_window": (s.get("spec") or {}).get("receiptWindow"),
        "split": ",".join(sa["spec"]["layerRange"] for sa in sas.values()),
        "placement": {f"stage{i}": sa["spec"]["nodeName"] for i, sa in sas.items()},   # at the end
        "placement_at_start": _first_placement(sas, fo),
        "nodes": {n: {"backend": (c.get("status") or {}).get("backend"),
                      "labels": c["spec"].get("labels"),
                      "shown": ((c.get("status") or {}).get("backend") or "?") +
                      ("" if c["spec"]["labels"].get("consortium.io/accelerator") == (c.get("status") or {}).get("backend")
                       else f" (labeled {c['spec']['labels'].get('consortium.io/accelerator')})")}
                  for n, c in nodes.items()},
        "prompt": opts.prompt, "prompt_tokens": len(drv.get("prompt_tokens") or []) or None,
        "max_tokens": opts.max_tokens, "threads_per_agent": opts.threads,
        "phase": st.get("phase"),
        "baseline": {"tokens": base.tokens, "text": base.text, "tokens_per_s": round(base.tokens_per_s, 3)},
        "distributed": {"tokens": tokens, "text": st.get("text"), "wall_s": round(wall, 3),
                        "generation_s": (st.get("metrics") or {}).get("wallSeconds"),
                        "tokens_per_s": (st.get("metrics") or {}).get("tokensPerSecond"),
                        "step_ms_median": (st.get("metrics") or {}).get("stepMsMedian"),
                        "steps": steps_of_report((st.get("report") or {}).get("steps"))},
        "exact_match": exact, "first_divergence": diverge,
        "audits": {"total": len(audits), "passed": count["Passed"],
                   "passed_within_tolerance": count["PassedWithinTolerance"], "mismatch": count["Mismatch"],
                   "fraud": count["Fraud"], "probability": opts.audit_probability, "seed": opts.audit_seed,
                   # as the standalone report gives them: windows audited from states, and how they compared
                   "from_state": ({**drv.get("state_audits", {}), "state_window": drv.get("audit_window")}
                                  if report_from_state else None),
                   "units": audits},
        "hash_equal_rate": round(sum(a["hash_equal"] for a in audits) / len(audits), 4) if audits else None,
        "false_fraud": len(set(quarantined) - {faulty_node, liar}) + honest_bad,
        "quarantined": quarantined,
        "quarantined_in_api": sorted(in_api),
        "fault": {"node": faulty_node, "stage": opts.faulty_stage, "kind": opts.fault,
                  "caught": faulty_node in quarantined, "quarantined_in_api": faulty_node in in_api,
                  "rollbacks": drv.get("rollbacks", [])} if faulty_node else None,
        "lying_verifier": ({**standalone.liar_figures(liar, opts.lie, drv), "quarantined_in_api": liar in in_api}
                           if liar else None),
        "failover": {"injected": bool(killed), **killed, "completed": bool(fo) and st.get("phase") == "Completed",
                     "at_token": fo[0]["at_token"] if fo else None, "backup_node": fo[0]["to"] if fo else None,
                     "failover_ms": fo[0]["ms"] if fo else None, "replayed_rows": fo[0]["replayed_rows"] if fo else None,
                     "spike_ms": (st.get("metrics") or {}).get("failoverSpikeMs"),
                     "events": fo, "stage_epochs": st.get("stageEpochs")},
        "events": sorted(set(events)),
        # A rollback to position 0 (a cheater caught in the prompt) recomputes it too: not a restart.
        "session_restarts": max(0, per_pos.get((0, 0), 1) - 1
                                - sum(r["to_position"] == 0 for r in drv.get("rollbacks", []))),
        "positions_computed_more_than_once": sum(1 for v in per_pos.values() if v > 1),
        "receipts_in_api": len(receipts),
        "proof_key": st.get("proofKey"),
        "fraud_proofs": fraud_proofs_in_api(receipts, audits, st.get("proofKey")),
        "receipt_verdicts": {v: verdicts.count(v) for v in sorted(set(map(str, verdicts)))},
        # The Receipts re-checked from the API alone, as `consortium verify-receipts` does.
        "receipts_check": {**{k: checked[k] for k in ("ok", "receipts", "verified", "failed", "complete", "gaps",
                                                     "fraud_proofs", "fraud_proofs_failed", "tokens_signed",
                                                     "tokens_unsigned", "tokens_unsigned_count",
                                                     "tokens_contradicted")},
                           "superseded": sum(p["superseded"] for p in checked["per_stage"])},
        "metrics": st.get("metrics"),
        "rpc": (st.get("report") or {}).get("rpc"),
    }
    report["success"] = bool(exact and st.get("phase") == "Completed" and report["false_fraud"] == 0
                             and report["session_restarts"] == 0 and (report["failover"]["completed"] or not killed)
                             and not any(a["verdict"] == "Mismatch" for a in honest_audits) and checked["ok"]
                             and (not faulty_node or report["fault"]["caught"])
                             and (not liar or report["lying_verifier"]["quarantined_in_api"]
                                  or not report["lying_verifier"]["accusations"]))
    return report


def fraud_proofs_in_api(receipts: list[dict], audits: list[dict], proof_key: str | None) -> list[dict]:
    """The proofs the operator put in the Receipts' status.fraudProofs, each checked again here,
    against the proof key the session's status publishes."""
    out = []
    for rc in receipts:
        for text in (rc.get("status") or {}).get("fraudProofs") or []:
            try:
                p = json.loads(text)
                # The node as the Receipt names it (its ComputeNode), as the audits do.
                e = {"session": p["session"], "stage": p["stage"], "position": p["position"],
                     "node": rc["spec"]["node"], "verifier": p["verifierId"]}
            except (ValueError, KeyError, TypeError) as err:
                out.append({"receipt": rc["metadata"]["name"], "node": rc["spec"]["node"], "holds": False, "proof": None,
                            "reasons": [f"unreadable proof: {err}"], "file": None})
                continue
            e["auditor"] = next((a["verifier"] for a in audits if (a["stage"], a["position"], a["node"]) ==
                                 (e["stage"], e["position"], e["node"]) and a["verdict"] == "Fraud"), None)
            [(_, holds, why)] = recheck([{**e, "proof": p}], proof_key)
            out.append({**e, "receipt": rc["metadata"]["name"], "holds": holds, "reasons": why,
                        "file": proof_file_name(e), "proof": p})
    return sorted(out, key=lambda e: (e.get("stage", -1), e.get("position", -1)))


def _first_placement(sas: dict, failovers: list[dict]) -> dict[str, str]:
    nodes = {i: sa["spec"]["nodeName"] for i, sa in sas.items()}
    for f in reversed(failovers):
        nodes[f["stage"]] = f["from"]
    return {f"stage{i}": n for i, n in nodes.items()}


def write(report: dict, json_out: str | None, report_dir: str | None) -> None:
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
    if report_dir:
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        write_proof_files(report.get("fraud_proofs") or [], out / "proofs")
        a = report["audits"]
        lines = ["# Test Case v1, through Kubernetes", "", *testreport.markdown(report), "## Details", "",
                 f"- placement {report['placement_at_start']} at the start, {report['placement']} at the end; "
                 f"split {report['split']}",
                 "- nodes: " + ", ".join(f"{n} {v['shown']}" for n, v in report["nodes"].items()),
                 f"- signing: {report['signing']} (receipt window {report['receipt_window']})",
                 f"- exact_match: **{report['exact_match']}** (first divergence {report['first_divergence']})",
                 f"- baseline {report['baseline']['tokens_per_s']} tok/s, distributed {report['distributed']['tokens_per_s']} "
                 f"tok/s ({report['threads_per_agent']} thread(s) per agent); median step "
                 f"{report['distributed']['step_ms_median']} ms; apply to Completed {report['distributed']['wall_s']} s",
                 f"- audits: {a['total']} ({a['passed']} Passed, {a['passed_within_tolerance']} PWT, {a['mismatch']} "
                 f"Mismatch, {a['fraud']} Fraud); false_fraud {report['false_fraud']}",
                 f"- failover: {json.dumps({k: v for k, v in report['failover'].items() if k != 'events'})}",
                 f"- session_restarts {report['session_restarts']}; receipts_in_api {report['receipts_in_api']} "
                 f"{report['receipt_verdicts']}",
                 f"- fraud proofs: {sum(p['holds'] for p in report['fraud_proofs'])} holding of "
                 f"{len(report['fraud_proofs'])}, from the Receipts' status.fraudProofs, files in proofs/ "
                 f"(check one: consortium verify-proof FILE --verifier-key {report.get('proof_key') or 'KEY'}, the "
                 "session's status.proofKey)",
                 f"- success: **{report['success']}**", ""]
        steps = [{"wall_ms": ms, "failover": fo} for _, _, ms, fo in report["distributed"].get("steps") or []]
        if steps:
            standalone.plot_latency(steps, out / "latency.png", testreport.outcome(report))
            lines += ["![latency](latency.png)", ""]
        (out / "summary.md").write_text("\n".join(lines))
