"""What the agent and its audit process share: an event the agent sets when a failover on this node
needs the audit process now, and a counter the audit process advances as it works.

The audit process does one task at a time, and an audit replay can take a few hundred milliseconds
there (it runs in the lowest CPU class). A failover that takes over an audit sequence (a Replay
with adopt_upto) sets the event for as long as its handover takes: an audit in flight, or queued
ahead of it, gives way at its next batch (refused ABORTED; the driver queues its units again). The
counter moves with every batch replayed and every task done, so the agent can tell a long audit from
a stuck one. A module of its own because the audit process's initializer imports it before numpy and
llama.cpp.
"""
from __future__ import annotations

from consortium import priority

GIVE_WAY = None   # in the audit process: the agent's multiprocessing Event
PROGRESS = None   # in the audit process: the agent's shared unsigned counter


def init(event, progress=None) -> None:
    """The audit process's initializer: its CPU class first, then what it shares with the agent."""
    global GIVE_WAY, PROGRESS
    priority.lower_thread_priority()
    GIVE_WAY, PROGRESS = event, progress


def must_give_way() -> bool:
    return GIVE_WAY is not None and GIVE_WAY.is_set()


def advance() -> None:
    """A batch replayed or a task done (the audit process is its only writer)."""
    if PROGRESS is not None:
        PROGRESS.value += 1
