"""`consortium testcase`: Test Case v1 through Kubernetes (the operator and three agents against the
local control plane); `--standalone`: the same with the driver in process and no Kubernetes."""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--standalone", action="store_true",
                   help="no Kubernetes: the driver in this process, agents as local processes")
    p.add_argument("--model", help="GGUF path or known name (default: smollm2-135m; gemma3-270m with --heterogeneous)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default=None, help="the user's message (default: the seed's sky question)")
    p.add_argument("--kill-stage", type=int, default=1, help="stage whose agent is SIGKILLed (default 1)")
    p.add_argument("--kill-at", type=int, default=20, help="token index at which it is killed (default 20)")
    p.add_argument("--no-kill", action="store_true", help="inject no failure")
    p.add_argument("--audit-probability", type=float, default=0.2)
    p.add_argument("--audit-seed", type=int, default=7)
    p.add_argument("--faulty-stage", type=int, help="the agent serving this stage cheats (with --fault)")
    p.add_argument("--fault", help="skip-layer, cheap-quant, noise-<scale>, replay, random")
    p.add_argument("--heterogeneous", action="store_true",
                   help="the metal-role node runs with CPU weight repacking off (other kernels) on a Q4_K_M model")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads per agent and for the baseline")
    p.add_argument("--json", metavar="OUT", help="write the report JSON here ('-' for stdout)")
    p.add_argument("--report", metavar="DIR", help="write report.json, summary.md and latency.png here")


def run(args: argparse.Namespace) -> int:
    from consortium import standalone
    from node_agent import faults

    if (args.faulty_stage is None) != (args.fault is None):
        print("error: --faulty-stage and --fault go together", file=sys.stderr)
        return 2
    try:
        if args.fault:
            faults.parse_fault(args.fault)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opts = standalone.Options(model=args.model, max_tokens=args.max_tokens,
                              kill_stage=None if args.no_kill else args.kill_stage, kill_at=args.kill_at,
                              audit_probability=args.audit_probability, audit_seed=args.audit_seed,
                              faulty_stage=args.faulty_stage, fault=args.fault, heterogeneous=args.heterogeneous,
                              threads=args.threads, prompt=args.prompt or standalone.PROMPT,
                              json_out=None if args.json in (None, "-") else args.json, report_dir=args.report)
    if not args.standalone:
        if args.faulty_stage is not None or args.heterogeneous or args.model:
            print("error: --faulty-stage, --heterogeneous and --model need --standalone so far", file=sys.stderr)
            return 2
        from consortium import kubecase

        report = kubecase.run(opts)
        kubecase.write(report, opts.json_out, opts.report_dir)
        if args.json == "-":
            print(json.dumps(report, indent=2))
        else:
            a, f = report["audits"], report["failover"]
            print(report["distributed"]["text"])
            print(f"\nexact_match {report['exact_match']} | audits {a['total']} (P {a['passed']}, PWT "
                  f"{a['passed_within_tolerance']}, M {a['mismatch']}, F {a['fraud']}) | false_fraud "
                  f"{report['false_fraud']} | failover {f['completed']} at token {f['at_token']} spike {f['spike_ms']} ms | "
                  f"restarts {report['session_restarts']} | receipts_in_api {report['receipts_in_api']} | "
                  f"{report['distributed']['tokens_per_s']} vs {report['baseline']['tokens_per_s']} tok/s | "
                  f"wall {report['distributed']['wall_s']} s | success {report['success']}", file=sys.stderr)
        return 0 if report["success"] else 1
    report = standalone.run(opts)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        a, f = report["audits"], report["failover"]
        print(report["distributed"]["text"])
        print(f"\nexact_match {report['exact_match']} | audits {a['total']} (P {a['passed']}, PWT "
              f"{a['passed_within_tolerance']}, M {a['mismatch']}, F {a['fraud']}) | false_fraud {report['false_fraud']} | "
              f"failover {f['completed']} spike {f['spike_ms']} ms | restarts {report['session_restarts']} | "
              f"{report['distributed']['tokens_per_s']} vs {report['baseline']['tokens_per_s']} tok/s | "
              f"success {report['success']}", file=sys.stderr)
    return 0 if report["success"] else 1
