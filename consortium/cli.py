"""The `consortium` command: everything a user does that is not kubectl or helm.

Each subcommand lives in its own module with two functions, `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their subcommand runs, so `consortium --help`
stays fast and a subcommand's heavy imports (llama.cpp, kubernetes) cost nothing elsewhere.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("consortium.commands.generate", "generate text, single-node or split into stages in one process"),
    "bench": ("consortium.commands.bench", "benchmarks with figures measured side by side in one run"),
    "cluster": ("consortium.commands.cluster", "start, stop or inspect the local Kubernetes control plane"),
    "ask": ("consortium.commands.ask", "create an InferenceSession for a prompt and stream its text as it is generated"),
    "chat": ("consortium.commands.chat", "a conversation in the terminal, each answer an InferenceSession followed as it is generated"),
    "api": ("consortium.commands.api", "an OpenAI-compatible chat endpoint: each request becomes an InferenceSession, its text streamed back"),
    "follow": ("consortium.commands.follow", "stream a session's text as it is generated, with its failovers, rollbacks and outcome"),
    "stop": ("consortium.commands.stop", "end a session's generation now: it completes with the tokens it has, their receipts and audits"),
    "testcase": ("consortium.commands.testcase", "Test Case v1 through Kubernetes (or --standalone): baseline, audits, a killed node, a report"),
    "calibrate": ("consortium.commands.calibrate", "measure honest and cheating stage outputs; choose the verification tolerances"),
    "chaos": ("consortium.commands.chaos", "randomized fault trials (kill, hang, partition, slow link, double failure, operator death) with agents in network namespaces"),
    "nodes": ("consortium.commands.nodes", "the ComputeNodes with their records; approve, quarantine or release one"),
    "report": ("consortium.commands.report", "one session's report (summary.md, report.json, latency.png) from the API or an archive"),
    "verify-proof": ("consortium.commands.verify_proof", "re-check a fraud proof file: HOLDS or DOES NOT HOLD, and why"),
    "verify-receipts": ("consortium.commands.verify_receipts", "re-check a session's Receipts from the API or an archive: signatures under the nodes' published keys, every position covered, fraud proofs"),
    "archive": ("consortium.commands.archive", "write a session's evidence to one file (the session, its Receipts, its nodes' keys) that verify-receipts --archive checks offline"),
    "prune": ("consortium.commands.prune", "delete sessions that ended before a given age, each archived first"),
    "certs": ("consortium.commands.certs", "a CA and mutual-TLS certificates for node agents and the operator"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="consortium", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # Arguments are declared by each subcommand's module; importing it is cheap by convention
    # (heavy imports happen inside run()).
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
