"""Set by the agent, seen by its audit process: a failover on this node needs the audit process now.

The audit process does one task at a time, and an audit replay can take a few hundred milliseconds
there (it runs in the lowest CPU class). A failover that takes over an audit sequence (a Replay
with adopt_upto) sets this event for as long as its handover takes: an audit in flight, or queued
ahead of it, gives way at its next batch (refused ABORTED; the driver queues its units again). A
module of its own because the audit process's initializer imports it before numpy and llama.cpp.
"""
from __future__ import annotations

from consortium import priority

GIVE_WAY = None   # in the audit process: the agent's multiprocessing Event


def init(event) -> None:
    """The audit process's initializer: its CPU class first, then the event to watch."""
    global GIVE_WAY
    priority.lower_thread_priority()
    GIVE_WAY = event


def must_give_way() -> bool:
    return GIVE_WAY is not None and GIVE_WAY.is_set()
