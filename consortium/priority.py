"""Background work gives way to the token's critical path.

Audits are optimistic (generation never waits for them) but an agent's audit replays cost about half
of the generation's CPU, on the same cores as the forward steps. Running them in threads of lower CPU
priority lets the scheduler prefer the forward steps when the cores are contended. Linux sets the
nice value per thread; elsewhere (macOS: per process) this does nothing rather than slow the agent.
"""
from __future__ import annotations

import os
import sys
import threading

BACKGROUND_NICE = 10


def lower_thread_priority(by: int = BACKGROUND_NICE) -> bool:
    """Raise the calling thread's nice value by `by` (at most 19); False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError:
        return False
    return True
