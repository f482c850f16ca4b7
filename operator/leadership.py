"""Several operator replicas, one driving: a Lease elects the leader (`consortium-operator --leader-elect`).

One operator pod is a single point of failure in time: when its node dies, Kubernetes replaces the
pod only once it declares the node lost (minutes), and every session waits that long. With two
replicas on two nodes the standby takes the Lease once the leader stops renewing it, and resumes the
sessions from their status as any restarted operator does (operator.md, Operator restart).

Only one may drive at a time, or two drivers would step the same agents: a leader that has not
renewed the Lease for `renew_s` (a partition, an API server away) exits at once, before its Lease
(`lease_s`, longer) can pass to another replica; a watchdog does it even when a renewal call hangs.
The price: where a single operator rides out an API server away, a leader exits after `renew_s`
without one, and its sessions go on when a replica leads again.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger("consortium.operator.leadership")

LEASE_NAME = "consortium-operator-leader"


def identity() -> str:
    """Who holds the Lease: the pod's name (its hostname in a pod) and the process."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{os.getpid()}"


def lead(namespace: str, name: str = LEASE_NAME, *, lease_s: int = 30, renew_s: int = 20) -> str:
    """Block until this process holds the Lease `namespace/name`, then keep it on threads of its own;
    the process exits (status 3) the moment it can no longer be sure it holds it. Returns the
    identity it holds it as."""
    from kubernetes.leaderelection import electionconfig, leaderelection
    from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

    retry_s = max(1.0, renew_s / 4)   # whole seconds for the Lease (its spec holds integers)
    me = identity()
    election = leaderelection.LeaderElection(electionconfig.Config(
        LeaseLock(name, namespace, me), lease_s, renew_s, retry_s,
        onstarted_leading=lambda: None, onstopped_leading=lambda: None))
    log.info("%s: waiting to lead (Lease %s/%s)", me, namespace, name)
    election.acquire()   # a follower until the Lease is free or its holder stopped renewing it
    log.info("%s: leading; the sessions are driven here", me)
    renewed = [time.monotonic()]

    def renew() -> None:
        while True:
            time.sleep(retry_s)
            try:
                if election.try_acquire_or_renew():
                    renewed[0] = time.monotonic()
            except Exception as e:  # noqa: BLE001 - the watchdog decides
                log.warning("renewing the leader Lease failed: %s", e)

    def watchdog() -> None:
        while True:
            time.sleep(0.25)
            if time.monotonic() - renewed[0] > renew_s:
                log.error("%s: the leader Lease was not renewed for %.0f s; exiting so that another replica "
                          "alone drives the sessions", me, renew_s)
                logging.shutdown()
                os._exit(3)

    threading.Thread(target=renew, name="leader-renew", daemon=True).start()
    threading.Thread(target=watchdog, name="leader-watchdog", daemon=True).start()
    return me
