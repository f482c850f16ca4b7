"""llama.cpp's own RPC mode, the anchor to beat: ggml-rpc-server per stage and llama-bench as the driver.

Both are built by scripts/llama-rpc.sh from the llama.cpp sources vendored in the pinned
llama-cpp-python, with GGML_RPC on. llama-bench offloads layers to the RPC devices in order; the
tensor split below places them where our split puts them, and the placement llama.cpp reports (its
debug log, one line per layer) is returned so the bench can show it rather than assume it.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

from consortium import processes
from consortium.layers import LayerRange

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "llama-rpc.sh"


def bin_dir() -> tuple[Path | None, str | None]:
    """(the folder holding ggml-rpc-server and llama-bench, None), or (None, why not)."""
    if not SCRIPT.is_file():
        return None, "scripts/llama-rpc.sh is not next to this package (not a source checkout)"
    proc = subprocess.run(["bash", str(SCRIPT), "--cached"], capture_output=True, text=True)
    if proc.returncode == 3:
        return None, "llama.cpp's RPC binaries are not built: run scripts/llama-rpc.sh"
    if proc.returncode != 0:
        return None, f"scripts/llama-rpc.sh failed: {proc.stderr.strip()[-500:]}"
    return Path(proc.stdout.strip().splitlines()[-1]), None


def tensor_split(split: list[LayerRange]) -> str:
    """llama.cpp splits n_layer + 1 units (the output layer is the last) by cumulative fractions: one
    unit per layer of a stage, plus the output for the last stage, reproduces our split exactly."""
    units = [r.count for r in split]
    units[-1] += 1
    return "/".join(str(u) for u in units)


class RpcServers:
    """One ggml-rpc-server per stage; prefixes (e.g. `ip netns exec NS`) and hosts per server."""

    def __init__(self, bins: Path, n: int, threads: int, hosts: list[str] | None = None,
                 prefixes: list[list[str]] | None = None, base_port: int = 0):
        import socket

        self.procs: list[subprocess.Popen] = []
        self.endpoints: list[str] = []
        hosts = hosts or ["127.0.0.1"] * n
        prefixes = prefixes or [[] for _ in range(n)]
        for i in range(n):
            if base_port:
                port = base_port + i
            else:   # a free port on loopback; inside a namespace any port is free
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
            self.procs.append(subprocess.Popen(
                [*prefixes[i], str(bins / "ggml-rpc-server"), "-H", hosts[i], "-p", str(port), "-t", str(threads)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            self.endpoints.append(f"{hosts[i]}:{port}")
        for ep, p in zip(self.endpoints, self.procs):
            _wait_port(ep, p)

    def close(self) -> None:
        processes.stop(self.procs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _wait_port(endpoint: str, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    import socket

    host, port = endpoint.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ggml-rpc-server on {endpoint} exited: {proc.stderr.read()[-1000:]}")
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ggml-rpc-server on {endpoint} did not listen")
            time.sleep(0.05)  # waiting for the server to bind, not for compute


def llama_bench(bins: Path, model: str, *, threads: int, n_prompt: int, n_gen: int, reps: int,
                rpc: list[str] | None = None, split: list[LayerRange] | None = None, timeout_s: float = 600) -> dict:
    """Prefill and generation tokens/s from llama-bench; with rpc, every layer on the RPC devices in
    our split, and the per-layer placement llama.cpp logged."""
    cmd = [str(bins / "llama-bench"), "-m", model, "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
           "-r", str(reps), "-o", "json"]
    if rpc:
        cmd += ["--rpc", ",".join(rpc), "-ngl", "99", "-sm", "layer", "-ts", tensor_split(split), "-v"]
    else:
        cmd += ["-ngl", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
    rows = json.loads(proc.stdout)
    out = {"command": " ".join(["llama-bench", *cmd[1:]]).replace(model, Path(model).name)}
    for r in rows:
        kind = "prefill" if r.get("n_prompt") and not r.get("n_gen") else "generation"
        out[kind] = {"tokens_per_s": round(float(r["avg_ts"]), 3), "stddev": round(float(r["stddev_ts"]), 3),
                     "samples": [round(float(x), 3) for x in r.get("samples_ts", [])]}
    if rpc:
        out["placement"] = placement(proc.stderr)
    return out


def placement(log: str) -> dict:
    """device -> the layers llama.cpp assigned to it (layer n_layer is the output layer)."""
    by_dev: dict[str, list[int]] = {}
    for m in re.finditer(r"layer\s+(\d+) assigned to device (\S+?),", log):
        by_dev.setdefault(m.group(2), []).append(int(m.group(1)))
    offloaded = re.search(r"offloaded (\d+)/(\d+) layers", log)
    return {"layers_by_device": {d: f"{min(v)}-{max(v)}" if v == list(range(min(v), max(v) + 1)) else v
                                 for d, v in by_dev.items()},
            "offloaded": offloaded.group(0) if offloaded else None}
