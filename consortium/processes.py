"""Stopping the child processes a run started (agents, proxies, llama.cpp's RPC servers, the operator)."""
from __future__ import annotations

import subprocess
from typing import Iterable


def stop(procs: Iterable[subprocess.Popen], timeout: float = 10.0, kill: Iterable[subprocess.Popen] = ()) -> None:
    """SIGTERM every process still running (SIGKILL those in `kill`: a stopped process cannot act
    on SIGTERM), wait up to `timeout` seconds for each, then SIGKILL what is left and reap it."""
    procs, kill = list(procs), set(map(id, kill))
    for p in procs:
        if p.poll() is None:
            p.kill() if id(p) in kill else p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
