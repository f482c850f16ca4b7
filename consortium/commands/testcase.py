"""`consortium testcase`: Test Case v1 through Kubernetes (the operator and three agents against the
local control plane); `--standalone`: the same with the driver in process and no Kubernetes."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--standalone", action="store_true",
                   help="no Kubernetes: the driver in this process, agents as local processes")
    p.add_argument("--model", help="GGUF path or known name (default: smollm2-135m; gemma3-270m with --heterogeneous)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default=None, help="the user's message (default: the seed's sky question)")
    p.add_argument("--kill-stage", type=int, default=1,
                   help="stage whose agent is SIGKILLed (default 1; through Kubernetes 0 or 1)")
    p.add_argument("--kill-at", type=int, default=20, help="token index at which it is killed (default 20)")
    p.add_argument("--no-kill", action="store_true", help="inject no failure")
    p.add_argument("--hang", action="store_true",
                   help="SIGSTOP the agent instead of killing it: alive but silent, caught by the RPC deadline "
                        "(--standalone)")
    p.add_argument("--rpc-timeout", type=float, default=None,
                   help="seconds before an unanswered RPC counts as a lost stage (default 30; --standalone)")
    p.add_argument("--audit-probability", type=float, default=0.2)
    p.add_argument("--audit-seed", type=int, default=7)
    p.add_argument("--audit-replay-rows", type=int, default=0, metavar="N",
                   help="audits replay decode steps in batches of up to N rows: cheaper, and bit-exact only where "
                        "the backend's kernels compute each row alone at that batch size (1: the original shapes; "
                        "default 0: each verifier merges them into batches of sizes it checked give the same "
                        "bits; --standalone)")
    p.add_argument("--audit-from-state", action="store_true",
                   help="audit whole windows, each from the KV states of the windows before it, which the node "
                        "holding the stage signs as they close, instead of replaying every earlier position "
                        "(through Kubernetes: the session's audit.fromWindowStates)")
    p.add_argument("--state-window", type=int, metavar="N",
                   help="positions per state window with --audit-from-state (default 4; through Kubernetes: "
                        "the session's audit.stateWindow)")
    p.add_argument("--sign-per-window", action="store_true",
                   help="agents commit and sign once per receipt window instead of after every step: one "
                        "signature per window and stage; the rows a dying node held uncommitted are signed "
                        "only by its replacement (through Kubernetes: the session's signing: PerWindow)")
    p.add_argument("--faulty-stage", type=int, help="the agent serving this stage cheats (with --fault)")
    p.add_argument("--fault", help="skip-layer, cheap-quant, noise-<scale>, replay, random, wrong-token (the last "
                                   "stage: it gives tokens its rows do not sample)")
    p.add_argument("--lying-verifier", choices=("N0", "N1", "N2"), metavar="NODE",
                   help="this node's audits answer other rows than its recomputation (through Kubernetes: N2): a verdict "
                        "accusing a worker is audited again on another node before it counts, so the liar is "
                        "caught instead of the workers it accused")
    p.add_argument("--lie", default="random", metavar="FAULT",
                   help="what the lying verifier answers: random (Fraud verdicts; default), noise-<scale> "
                        "(noise-0.1: Mismatch verdicts) or replay")
    p.add_argument("--heterogeneous", action="store_true",
                   help="the metal-role node runs with CPU weight repacking off (other kernels) on a Q4_K_M model")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads per agent and for the baseline")
    p.add_argument("--plaintext", action="store_true",
                   help="gRPC without TLS (development only); by default a CA made for the run issues "
                        "mutual-TLS certificates to the agents and the driver")
    p.add_argument("--tls-issuer", choices=("admin", "operator"), default="admin",
                   help="through Kubernetes, who issues the agents' certificates (the chart's tls.issuer): admin "
                        "(default: the run's CA, as `consortium certs` would) or operator (the agents ask for "
                        "theirs through CertificateSigningRequests and the operator signs them)")
    p.add_argument("--extension", action="append", default=[], metavar="NAME",
                   help="an extension test of the seed (repeatable): audit-50, batch, faulty-worker, grid-sweep "
                        "(docs/testcase-extensions.md)")
    p.add_argument("--backups", metavar="NODES",
                   help="--standalone: the nodes that may take a stage over, comma-separated (default any of N0, "
                        "N1, N2); with none left for a lost stage the run ends Failed and keeps its record")
    p.add_argument("--json", metavar="OUT", help="write the report JSON here ('-' for stdout)")
    p.add_argument("--report", metavar="DIR", help="write report.json, summary.md and latency.png here")


def run(args: argparse.Namespace) -> int:
    from consortium import extensions, standalone
    from node_agent import faults

    if (args.faulty_stage is None) != (args.fault is None):
        print("error: --faulty-stage and --fault go together", file=sys.stderr)
        return 2
    # The report is written here, after the extensions' figures are in it.
    opts = standalone.Options(model=args.model, max_tokens=args.max_tokens,
                              kill_stage=None if args.no_kill else args.kill_stage, kill_at=args.kill_at,
                              audit_probability=args.audit_probability, audit_seed=args.audit_seed,
                              faulty_stage=args.faulty_stage, fault=args.fault, heterogeneous=args.heterogeneous,
                              threads=args.threads, prompt=args.prompt or standalone.PROMPT,
                              hang=args.hang, plaintext=args.plaintext, tls_issuer=args.tls_issuer,
                              audit_replay_rows=args.audit_replay_rows,
                              sign_per_window=args.sign_per_window, audit_from_state=args.audit_from_state,
                              state_window=args.state_window, lying_verifier=args.lying_verifier, lie=args.lie,
                              logs_dir=str(Path(args.report) / "agents") if args.report else None,
                              backups=tuple(n.strip().upper() for n in args.backups.split(",") if n.strip())
                              if args.backups is not None else None,
                              **({} if args.rpc_timeout is None else {"rpc_timeout_s": args.rpc_timeout}))
    try:
        extensions.apply(args.extension, opts, prompt_given=args.prompt is not None,
                         fault_given=args.fault is not None, audit_given=args.audit_probability != 0.2)
        if opts.audit_replay_rows < 0:
            raise ValueError("--audit-replay-rows must be at least 0")
        if opts.fault:
            faults.parse_fault(opts.fault)
        if not faults.parse_fault(opts.lie).transforms_output:
            raise ValueError("--lie takes noise-<scale>, replay or random")
        if opts.backups is not None and not set(opts.backups) <= set(standalone.NODES):
            raise ValueError(f"--backups takes nodes of {', '.join(standalone.NODES)}, got {','.join(opts.backups)}")
        if opts.tls_issuer == "operator" and (args.standalone or opts.plaintext):
            raise ValueError("--tls-issuer operator is for runs through Kubernetes with TLS (not --standalone, "
                             "not --plaintext)")
        if opts.faulty_stage is not None and not 0 <= opts.faulty_stage < len(standalone.PLACEMENT):
            raise ValueError(f"--faulty-stage must be 0-{len(standalone.PLACEMENT) - 1}")
        if opts.fault and not faults.parse_fault(opts.fault).changes_rows and opts.faulty_stage != len(standalone.PLACEMENT) - 1:
            raise ValueError(f"--fault {opts.fault} is the final stage's: --faulty-stage {len(standalone.PLACEMENT) - 1}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    json_out = None if args.json in (None, "-") else args.json
    if not args.standalone:
        if (args.heterogeneous or args.model or args.hang or args.rpc_timeout or args.audit_replay_rows
                or args.backups is not None):
            print("error: --heterogeneous, --model, --hang, --rpc-timeout, --audit-replay-rows and --backups need "
                  "--standalone so far (through Kubernetes a session's spec.backupSelector chooses its backups)",
                  file=sys.stderr)
            return 2
        from consortium import kubecase

        for flag, stage in (("--faulty-stage", opts.faulty_stage), ("--kill-stage", opts.kill_stage)):
            if stage is not None and stage not in kubecase.REPLACEABLE_STAGES:
                print(f"error: through Kubernetes {flag} must be one of {sorted(kubecase.REPLACEABLE_STAGES)}: stage "
                      "2's node is the only coordinator, the backup of every stage, so nobody could take its stage "
                      "over (--standalone takes any stage)", file=sys.stderr)
                return 2
        if args.lying_verifier and args.lying_verifier.lower() not in kubecase.LYING_VERIFIERS:
            print(f"error: through Kubernetes --lying-verifier must be one of "
                  f"{[n.upper() for n in kubecase.LYING_VERIFIERS]}: n0 and n2 verify, and n0 is the only "
                  "coordinator, so nobody could take its stage over (--standalone takes any node)", file=sys.stderr)
            return 2
        overrides: dict = {}
        if args.sign_per_window:
            overrides["signing"] = "PerWindow"
        if args.audit_from_state:
            overrides.setdefault("audit", {})["fromWindowStates"] = True
            if args.state_window is not None:
                overrides["audit"]["stateWindow"] = args.state_window
        report = kubecase.run(opts, spec_overrides=overrides)
        extensions.add_figures(args.extension, report, opts)
        kubecase.write(report, json_out, args.report)
    else:
        report = standalone.run(opts)
        extensions.add_figures(args.extension, report, opts)
        standalone.write(report, json_out, args.report)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(report["distributed"]["text"])
        if report.get("failure"):
            print(f"\nFAIL: the session could not go on: {report['failure']['message']}", file=sys.stderr)
        print("\n" + verdict_line(report), file=sys.stderr)
    return 0 if report["success"] else 1


def verdict_line(report: dict) -> str:
    a, f, d = report["audits"], report["failover"], report["distributed"]
    parts = [f"exact_match {report['exact_match']}",
             f"audits {a['total']} (P {a['passed']}, PWT {a['passed_within_tolerance']}, M {a['mismatch']}, "
             f"F {a['fraud']})",
             f"false_fraud {report['false_fraud']}",
             f"failover {f['completed']}" + (f" at token {f['at_token']}" if f.get("at_token") is not None else "")
             + f" spike {f.get('spike_ms')} ms",
             f"restarts {report['session_restarts']}"]
    if "receipts_in_api" in report:
        parts.append(f"receipts_in_api {report['receipts_in_api']}")
    parts.append(f"{d['tokens_per_s']} vs {report['baseline']['tokens_per_s']} tok/s")
    if d.get("wall_s") is not None:
        parts.append(f"wall {d['wall_s']} s")
    parts.append(f"success {report['success']}")
    return " | ".join(parts)
