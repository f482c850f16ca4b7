"""`consortium chaos`: randomized fault trials through Kubernetes with the agents on hosts of their
own (network namespaces): kill, hang, partition, slow link, double failure, operator death, and on
request an API server that hangs. Needs root (network namespaces); see docs/reliability.md."""
from __future__ import annotations

import argparse
import json
import signal
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=int, default=20, help="number of trials (default 20; every fault kind "
                                                          "equally often, in random order)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per trial session (default 24)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random plan: fault order, stages, tokens")
    p.add_argument("--faults", default=None,
                   help="comma-separated kinds of kill,hang,partition,slow,double,operator (the default: "
                        "all of them) and apiserver (named only: the API server hung for 12 s)")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads per agent and for the baseline")
    p.add_argument("--json", metavar="OUT", help="write {'summary', 'trials': [...]} here")


def run(args: argparse.Namespace) -> int:
    from consortium import chaos, netlab

    kinds = tuple(k.strip() for k in args.faults.split(",") if k.strip()) if args.faults else chaos.FAULTS
    try:
        plan = chaos.plan(args.trials, args.max_tokens, args.seed, kinds)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    why = netlab.available()
    if why:
        print(f"error: {why}; consortium chaos runs the agents in network namespaces", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    results = run_plan(plan, args.max_tokens, args.threads, args.json)
    s = chaos.summary(results)
    print(json.dumps(s, indent=2), file=sys.stderr)
    return 0 if s["passed"] == s["trials"] else 1


def _interrupt(*_) -> None:
    """SIGTERM unwinds like Ctrl-C, so the namespaces, links and processes are removed."""
    raise KeyboardInterrupt()


def run_plan(plan, max_tokens: int, threads: int, json_out: str | None) -> list[dict]:
    import tempfile
    from pathlib import Path

    from consortium import chaos, kubecase, testbed

    cl, started_here = kubecase.local_cluster("the chaos trials")
    results: list[dict] = []
    try:
        prompt = testbed.sky_is_blue(max_tokens)["spec"]["prompt"]
        baseline = kubecase.baseline(max_tokens, prompt, threads).tokens
        bed = testbed.Testbed(cl, Path(tempfile.mkdtemp(prefix="consortium-chaos-")), threads=threads)
        try:
            bed.install()
            bed.start_operator()
            lab = chaos.ChaosLab(bed)
            try:
                for t in plan:
                    try:
                        res = chaos.run_trial(lab, t, baseline, max_tokens)
                    except Exception as e:  # noqa: BLE001 - one trial's failure is a result, not the end
                        res = {"trial": t.index, "fault": t.fault, "stage": t.stage, "at_token": t.at_token,
                               "completed": False, "identical": False, "receipts_complete": False,
                               "false_fraud": None, "recovery_ms": None, "error": f"{type(e).__name__}: {e}"}
                    results.append(res)
                    print(_line(res), file=sys.stderr, flush=True)
                    if json_out:
                        _write(json_out, results, chaos)
            finally:
                lab.close()
        finally:
            bed.close()
            print(f"logs in {bed.workdir}", file=sys.stderr)
    finally:
        if started_here:
            cl.stop()
    return results


def _line(t: dict) -> str:
    where = ("control plane" if t["stage"] is None
             else f"stage {t['stage']}" + (f" ({t.get('victim')})" if t.get("victim") else ""))
    fo = ", ".join(f"s{f['stage']} {f['from']}->{f['to']}" for f in t.get("failovers") or [])
    return (f"trial {t['trial']:2d} {t['fault']:9s} {where:16s} token {t['at_token']:2d}: completed {t['completed']}, "
            f"identical {t['identical']}, receipts {t['receipts_complete']}, false_fraud {t['false_fraud']}, "
            f"recovery {t['recovery_ms']} ms" + (f", failovers [{fo}]" if fo else "")
            + (f", stale write refused {t['stale_write_refused']}" if t.get("stale_write_refused") is not None else "")
            + (f", moved while the API hung {t['moved_while_api_hung']}" if t.get("moved_while_api_hung") is not None
               else "")
            + (f", {t['phase']}: {t['reason']}" if t.get("phase") == "Failed" else "")
            + (f", ERROR {t['error']}" if t.get("error") else ""))


def _write(path: str, results: list[dict], chaos) -> None:
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"summary": chaos.summary(results), "trials": results}, indent=2) + "\n")
