"""`consortium bench`: benchmarks that print figures, ratios measured side by side in one run."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=["anchors", "engine", "dataplane", "tls"], default="anchors",
                   help="anchors (default): single-node llama.cpp, our split in process, our agents on loopback, "
                        "llama.cpp's RPC mode on the same split, both over emulated distance, commitment and audit "
                        "cost, failover spikes, concurrent sessions, memory per stage (docs/benchmarks.md); "
                        "engine: split-in-process vs unsplit tokens/s, each stage's memory against its weights, and "
                        "auditing a window from the worker's KV state against replaying every earlier position; "
                        "dataplane: three agents vs single node with and without audits, commitment and signature "
                        "share of token time, audit cost, failover spike; tls: mutual TLS against plaintext on the "
                        "agent link (handshake, small calls, activations)")
    p.add_argument("--model", help="GGUF path or known name (default: smollm2-135m)")
    p.add_argument("--split", default=None, help="layer ranges, engine suite only (default: three even "
                   "stages; anchors and dataplane use the test case's three even stages)")
    p.add_argument("--tokens", type=int, default=64, help="decode tokens per round")
    p.add_argument("--rounds", type=int, default=None,
                   help="alternating rounds of unsplit and split (default: 5 for engine, 3 for anchors)")
    p.add_argument("--threads", type=int, default=None,
                   help="llama.cpp threads per stage (default: every core for engine, 1 per stage for dataplane and anchors)")
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON")
    a = p.add_argument_group("anchors suite")
    a.add_argument("--report", metavar="DIR", help="write report.json, summary.md and anchors.png there")
    a.add_argument("--prompt-tokens", type=int, default=64, help="prefill length")
    a.add_argument("--rtts", default="0,1,10", help="emulated round-trip latencies in ms, comma-separated")
    a.add_argument("--distance-tokens", type=int, default=32, help="generated tokens per distance row")
    a.add_argument("--failover-runs", type=int, default=10, help="runs with stage 1 killed at token 20")
    a.add_argument("--failover-contexts", default="64,192",
                   help="also kill at these tokens (longer replay), comma-separated; empty for none")
    a.add_argument("--failover-context-runs", type=int, default=2,
                   help="runs per extra kill token, each way: decode steps merged and in the original shapes; "
                        "at the last token also with 20%% audits, the backup taking over its audit replay or not")
    a.add_argument("--cold-backups", action="store_true",
                   help="failover runs without the backup loading the stage ahead (the driver's warm_backups off)")
    a.add_argument("--concurrent", default="2,4", help="numbers of sessions run at once, comma-separated")
    a.add_argument("--audit-replay-rows", type=int, default=32, metavar="N",
                   help="also run 20%% audits replaying decode steps N rows at a time (1: not)")
    a.add_argument("--no-rpc", action="store_true", help="skip llama.cpp's RPC mode")
    a.add_argument("--no-distance", action="store_true", help="skip the network namespace rows")
    a.add_argument("--no-memory", action="store_true", help="skip memory per stage")


def run(args: argparse.Namespace) -> int:
    from consortium.layers import even_split, format_split, parse_split, validate_split
    from consortium.models import resolve_model
    from node_agent.engine import benchmark, llama as ll
    from node_agent.engine.slicing import read_model_info

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.suite == "anchors":
        return _anchors(args, log)
    if args.suite == "tls":
        from consortium import tls_bench

        res = tls_bench.run(args.model, args.rounds or 6, 50, log)
        print(tls_bench.summary(res))
        if args.json:
            _write_json(args.json, res)
        return 0
    if args.suite == "dataplane":
        from consortium import dataplane_bench

        res = dataplane_bench.run(args.model, args.tokens, 1 if args.threads is None else args.threads, log)
        print(dataplane_bench.summary(res))
        if args.json:
            _write_json(args.json, res)
        return 0
    threads = args.threads or 0
    model = str(resolve_model(args.model))
    info = read_model_info(model)
    split = validate_split(parse_split(args.split), info.n_layers) if args.split else even_split(info.n_layers, 3)
    log(f"engine benchmark: {info.architecture} {info.file_type}, {info.n_layers} layers, split {format_split(split)}")
    result = {"model": {"path": model, "architecture": info.architecture, "file_type": info.file_type},
              "llama_cpp": ll.build_info(), "speed": benchmark.speed(model, split, n_tokens=args.tokens,
                                                                       rounds=args.rounds or 5, threads=threads,
                                                                       log=log)}
    result["memory"] = benchmark.memory(model, split, threads=threads)
    result["window_audit"] = benchmark.window_audit(model, split, threads=threads or 1, log=log)
    s = result["speed"]
    print(f"split-in-process over unsplit tokens/s: {s['split_over_unsplit']:.3f} "
          f"(median {s['split_median']} vs {s['unsplit_median']} tok/s over {s['rounds']} rounds; target >= 0.95)")
    print(f"{'stage':>8} {'weights MiB':>12} {'resident MiB':>13} {'resident/weights':>17}")
    for row in result["memory"]:
        print(f"{row['layers']:>8} {row['weights_bytes'] / 2**20:12.1f} {row['rss_delta_bytes'] / 2**20:13.1f} "
              f"{row['rss_over_weights']:17.2f}")
    print("auditing one window from the worker's KV state of the earlier positions, against replaying them all "
          "(CPU ms; projection at 20% of windows audited, the worker's state exports included):")
    print(f"{'stage':>8} {'context':>8} {'from state':>11} {'full replay':>12} {'ratio':>7} {'bit-identical':>14} "
          f"{'audit20 / generation':>21}")
    for row in result["window_audit"]:
        print(f"{row['layers']:>8} {row['context']:>8} {row['window_from_state_cpu_ms']:11.1f} "
              f"{row['full_replay_cpu_ms']:12.1f} {row['window_over_full']:7.3f} {str(row['bit_identical']):>14} "
              f"{row['projected_audit20_cpu_ratio']:21.3f}")
    if args.json:
        _write_json(args.json, result)
    return 0


def _write_json(path: str, res: dict) -> None:
    # Its folder may not exist yet: a long run must not end in FileNotFoundError.
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(res, indent=2))


def _numbers(text: str, name: str, kind=float) -> tuple:
    try:
        vals = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"consortium bench: --{name} takes comma-separated numbers, got {text!r}")
    if any(v < 0 for v in vals):
        raise SystemExit(f"consortium bench: --{name} takes numbers >= 0, got {text!r}")
    return vals


def _anchors(args: argparse.Namespace, log) -> int:
    from consortium.anchors import bench, report

    if args.split:
        raise SystemExit("consortium bench: --split is for --suite engine; the anchors suite uses three even stages")
    for name in ("tokens", "prompt_tokens", "distance_tokens"):
        if getattr(args, name) < 2:
            raise SystemExit(f"consortium bench: --{name.replace('_', '-')} must be at least 2")
    if ((args.rounds is not None and args.rounds < 1) or args.failover_runs < 1 or args.failover_context_runs < 1
            or args.audit_replay_rows < 1):
        raise SystemExit("consortium bench: --rounds, --failover-runs, --failover-context-runs and "
                         "--audit-replay-rows must be at least 1")
    concurrent = _numbers(args.concurrent, "concurrent", int)
    if any(c < 1 or c > 7 for c in concurrent):
        raise SystemExit("consortium bench: --concurrent takes session counts from 1 to 7 (an agent has 8 slots)")
    s = bench.Settings(model=args.model, tokens=args.tokens, prompt_tokens=args.prompt_tokens,
                       rounds=args.rounds or 3, threads=1 if args.threads is None else args.threads,
                       rtts_ms=_numbers(args.rtts, "rtts"), distance_tokens=args.distance_tokens,
                       failover_runs=args.failover_runs,
                       failover_contexts=_numbers(args.failover_contexts, "failover-contexts", int),
                       failover_context_runs=args.failover_context_runs, concurrent=concurrent,
                       warm_backups=not args.cold_backups,
                       audit_replay_rows=args.audit_replay_rows,
                       rpc=not args.no_rpc, distance=not args.no_distance, memory=not args.no_memory)
    res = bench.run(s, log)
    print(report.summary(res))
    if args.json:
        _write_json(args.json, res)
    if args.report:
        report.write(res, args.report)
    return 0
