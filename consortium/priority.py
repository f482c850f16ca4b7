"""Background work gives way to the token's critical path.

Audits are optimistic (generation never waits for them) but an agent's audit replays cost about as
much CPU as the generation, on the same cores as the forward steps. On Linux their threads go into
the SCHED_IDLE class, which the scheduler runs only when no ordinary thread wants the core (with a
raised nice value as the fallback where the class is refused); a thread's class is its own, and the
llama.cpp threads it starts inherit it. A nice value alone still lets an audit take time slices from
a step, whose llama.cpp threads wait for each other at every graph node (docs/dataplane.md has the
figures). Elsewhere (macOS: nice is per process) this does nothing rather than slow the agent.
"""
from __future__ import annotations

import os
import sys
import threading

BACKGROUND_NICE = 10   # the fallback where SCHED_IDLE is refused


def lower_thread_priority(by: int = BACKGROUND_NICE) -> bool:
    """Make the calling thread background work: SCHED_IDLE, else its nice value raised by `by` (at
    most 19). False where neither can be done."""
    if not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return True
    except (OSError, AttributeError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError:
        return False
    return True
