"""`consortium bench`: benchmarks that print figures, ratios measured side by side in one run."""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=["engine", "dataplane", "tls"], default="engine",
                   help="engine: split-in-process vs unsplit tokens/s, and each stage's memory against its weights; "
                        "dataplane: three agents vs single node with and without audits, commitment and signature "
                        "share of token time, audit cost, failover spike; tls: mutual TLS against plaintext on the "
                        "agent link (handshake, small calls, activations)")
    p.add_argument("--model", help="GGUF path or known name (default: smollm2-135m)")
    p.add_argument("--split", default=None, help="layer ranges (default: three even stages)")
    p.add_argument("--tokens", type=int, default=64, help="decode tokens per round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of unsplit and split")
    p.add_argument("--threads", type=int, default=None,
                   help="llama.cpp threads per stage (default: every core for engine, 1 per agent for dataplane)")
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON")


def run(args: argparse.Namespace) -> int:
    from consortium.layers import even_split, format_split, parse_split, validate_split
    from consortium.models import resolve_model
    from node_agent.engine import benchmark, llama as ll
    from node_agent.engine.slicing import read_model_info

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.suite == "tls":
        from consortium import tls_bench

        res = tls_bench.run(args.model, args.rounds, 50, log)
        print(tls_bench.summary(res))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
        return 0
    if args.suite == "dataplane":
        from consortium import dataplane_bench

        res = dataplane_bench.run(args.model, args.tokens, 1 if args.threads is None else args.threads, log)
        print(dataplane_bench.summary(res))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
        return 0
    threads = args.threads or 0
    model = str(resolve_model(args.model))
    info = read_model_info(model)
    split = validate_split(parse_split(args.split), info.n_layers) if args.split else even_split(info.n_layers, 3)
    log(f"engine benchmark: {info.architecture} {info.file_type}, {info.n_layers} layers, split {format_split(split)}")
    result = {"model": {"path": model, "architecture": info.architecture, "file_type": info.file_type},
              "llama_cpp": ll.build_info(), "speed": benchmark.speed(model, split, n_tokens=args.tokens,
                                                                       rounds=args.rounds, threads=threads, log=log)}
    result["memory"] = benchmark.memory(model, split, threads=threads)
    s = result["speed"]
    print(f"split-in-process over unsplit tokens/s: {s['split_over_unsplit']:.3f} "
          f"(median {s['split_median']} vs {s['unsplit_median']} tok/s over {s['rounds']} rounds; target >= 0.95)")
    print(f"{'stage':>8} {'weights MiB':>12} {'resident MiB':>13} {'resident/weights':>17}")
    for row in result["memory"]:
        print(f"{row['layers']:>8} {row['weights_bytes'] / 2**20:12.1f} {row['rss_delta_bytes'] / 2**20:13.1f} "
              f"{row['rss_over_weights']:17.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
