"""`consortium cluster up|down|status`: the local Kubernetes control plane for development.

`up` and `status` end with a line `KUBECONFIG=<path>`, so `export "$(consortium cluster up | tail -1)"`
points kubectl and helm at it.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "down", "status"],
                        help="up: start (detached) or report it is already up; down: stop and delete its "
                             "state; status: report and exit 0 only if it is up and ready")
    parser.add_argument("--state-dir", default=None,
                        help="where certificates, etcd data, logs and the kubeconfig live "
                             "(default: ${CONSORTIUM_CACHE:-~/.cache/consortium}/cluster)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness in `up`")


def run(args: argparse.Namespace) -> int:
    from consortium import cluster as c

    state_dir = args.state_dir or c.default_state_dir()
    lc = c.LocalCluster(state_dir)
    if args.action == "up":
        if lc.is_running() and lc.is_ready():
            print(f"already up: Kubernetes {lc.version} at {lc.server}")
        else:
            lc.start(detach=True, timeout=args.timeout)
            print(f"up: Kubernetes {lc.version} at {lc.server} in {lc.start_seconds:.1f}s "
                  f"(logs in {lc.logs_dir})")
        print(f"KUBECONFIG={lc.kubeconfig}")
        return 0
    if args.action == "down":
        if not lc.state_file.exists():
            print(f"not running (no state in {lc.state_dir})")
            return 0
        lc.stop(remove=True)
        print(f"down: stopped and removed {lc.state_dir}")
        return 0
    # status
    procs = lc.processes()
    if not procs:
        print(f"down (no state in {lc.state_dir})")
        return 1
    for name, alive in procs.items():
        print(f"{name:24s} pid {lc.pids[name]:<8d} {'running' if alive else 'not running'}")
    ready = lc.is_running() and lc.is_ready()
    print(f"{'up' if ready else 'not ready'}: Kubernetes {lc.version} at {lc.server}")
    print(f"KUBECONFIG={lc.kubeconfig}")
    return 0 if ready else 1
