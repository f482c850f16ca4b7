"""Kubernetes access shared by the operator and the node agent: one client per process, conditions
in the Kubernetes convention, Events, and Lease times.

Both sides write conditions into lists that another writer may touch too (the agent's Ready and the
operator's Quarantined on one ComputeNode), so condition updates read the object, change one entry
and write back with the resourceVersion they read: a 409 means someone else wrote first, and the
update is read and applied again instead of overwriting theirs.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from typing import Any, Callable

from consortium import resources as r

log = logging.getLogger("consortium.kube")

GROUP, VERSION = r.GROUP, r.VERSION


def load_config(kubeconfig: str | None = None) -> None:
    """A kubeconfig file when given (or KUBECONFIG), else the in-cluster ServiceAccount."""
    from kubernetes import config

    if kubeconfig or os.environ.get("KUBECONFIG") or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_kube_config(config_file=kubeconfig)
    else:
        config.load_incluster_config()


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def timestamp(t: dt.datetime | None = None) -> str:
    return (t or now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(t: dt.datetime | None = None) -> str:
    return (t or now()).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: Any) -> dt.datetime | None:
    if text is None:
        return None
    if isinstance(text, dt.datetime):
        return text if text.tzinfo else text.replace(tzinfo=dt.timezone.utc)
    s = str(text).replace("Z", "+00:00")
    return dt.datetime.fromisoformat(s)


_shared: tuple[Any, Any] | None = None   # (the default configuration, the ApiClient made from it)
_shared_lock = threading.Lock()
# (connect, read) seconds for a call that names no timeout of its own. The client's default is none:
# an API server that hangs (a stopped process, a link that drops packets) held a call, and the
# session's token loop waiting on it, for as long as it hung.
REQUEST_TIMEOUT_S = (5.0, 30.0)


def _timed_client_class():
    from kubernetes import client

    class TimedApiClient(client.ApiClient):
        def call_api(self, method, url, header_params=None, body=None, post_params=None, _request_timeout=None):
            return super().call_api(method, url, header_params, body, post_params,
                                    REQUEST_TIMEOUT_S if _request_timeout is None else _request_timeout)

    return TimedApiClient


def _client():
    """One ApiClient, so one pool of kept-alive connections, for as long as the default configuration
    is the one it was made from (loading a kubeconfig replaces it). Without one, each API object made
    its own: a copy of the configuration and a new TLS connection for every request, which in a long
    session cost the operator's auditor thread a tenth of its time and the API server as much."""
    global _shared
    from kubernetes import client

    default = client.Configuration.get_default()
    with _shared_lock:
        if _shared is None or _shared[0] is not default:
            _shared = (default, _timed_client_class()())   # made from a copy of `default`
        return _shared[1]


def api():
    from kubernetes import client

    return client.CustomObjectsApi(_client())


def core():
    from kubernetes import client

    return client.CoreV1Api(_client())


def coordination():
    from kubernetes import client

    return client.CoordinationV1Api(_client())


def certificates():
    from kubernetes import client

    return client.CertificatesV1Api(_client())


def session_unread(e, namespace: str, name: str) -> str:
    """Why a command could not read a session, from the API's refusal: missing, or the server's status."""
    return (f"inferencesession {namespace}/{name} not found" if e.status == 404 else
            f"the API server answered {e.status} {e.reason}")


def unreachable(e: BaseException) -> str:
    """What a command says when its kubeconfig or the API server fails it before any answer."""
    return f"cannot reach the API server: {type(e).__name__}: {e}"


def is_status(e: Exception, *codes: int) -> bool:
    return getattr(e, "status", None) in codes


# -- conditions --------------------------------------------------------------------------------


def owned_by(obj: dict, uid: str) -> bool:
    """True if `obj` belongs to the object with this uid (not to a deleted namesake's, which the
    garbage collector may not have removed yet)."""
    return any(o.get("uid") == uid for o in obj["metadata"].get("ownerReferences") or [])


def condition(conditions: list[dict] | None, type_: str) -> dict | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def condition_true(obj: dict, type_: str) -> bool:
    c = condition((obj.get("status") or {}).get("conditions"), type_)
    return bool(c and c.get("status") == "True")


def with_condition(conditions: list[dict] | None, type_: str, status: bool | str, reason: str, message: str = "",
                   generation: int | None = None) -> list[dict]:
    """The list with one condition set; lastTransitionTime moves only when the status changes."""
    status = status if isinstance(status, str) else ("True" if status else "False")
    out = [dict(c) for c in conditions or []]
    old = condition(out, type_)
    entry = {"type": type_, "status": status, "reason": reason, "message": message[:4000],
             "lastTransitionTime": old["lastTransitionTime"] if old and old.get("status") == status
             and old.get("lastTransitionTime") else timestamp()}
    if generation is not None:
        entry["observedGeneration"] = generation
    if old is None:
        out.append(entry)
    else:
        out[out.index(old)] = entry
    return out


# Statuses an API server answers while it starts or is overloaded, before its authorizer has
# synced (401, 403) or while it is not ready (429, 5xx): a write refused with one may pass later.
TRANSIENT_STATUSES = {401, 403, 408, 429, 500, 502, 503, 504}


def transient(e: BaseException) -> bool:
    """Whether a failed call may pass if made again: no answer at all (no connection, a timeout,
    a TLS handshake cut short: the client's status 0) or one of TRANSIENT_STATUSES. A refusal of the
    request itself (400, 404, 409, 422) is not, nor an error of the caller's own (a TypeError)."""
    from urllib3.exceptions import HTTPError

    status = getattr(e, "status", None)
    if status is not None:
        return not status or status in TRANSIENT_STATUSES
    return isinstance(e, (HTTPError, OSError))


def reason(e: BaseException) -> str:
    """A short account of a failed call, for logs and Events (an ApiException's str() is its body)."""
    status = getattr(e, "status", None)
    if status:
        return f"{status} {getattr(e, 'reason', '') or ''}".strip()
    return f"{type(e).__name__}: {e}"[:300]


def update_status(get: Callable[[], dict], patch: Callable[[dict], Any], change: Callable[[dict], dict],
                  attempts: int = 8) -> Any:
    """Read, change the status, write with the read resourceVersion; on 409 read again and retry."""
    from kubernetes.client.exceptions import ApiException

    for i in range(attempts):
        obj = get()
        status = change(dict(obj.get("status") or {}))
        body = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}, "status": status}
        try:
            return patch(body)
        except ApiException as e:
            if e.status != 409 or i == attempts - 1:
                raise
    return None


# -- events ------------------------------------------------------------------------------------


def event(obj: dict, reason: str, message: str, *, type_: str = "Normal", component: str = "consortium-operator",
          namespace: str | None = None) -> None:
    """An Event about `obj` (a decision, a failure); never raises, events are best effort."""
    md = obj.get("metadata", {})
    ns = md.get("namespace") or namespace or "default"
    t = micro_time()
    body = {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{md.get('name', 'object')}.", "namespace": ns},
        "involvedObject": {"apiVersion": obj.get("apiVersion", r.API_VERSION), "kind": obj.get("kind"),
                           "name": md.get("name"), "namespace": md.get("namespace"), "uid": md.get("uid")},
        "reason": reason, "message": message[:1000], "type": type_,
        "source": {"component": component}, "reportingComponent": component,
        "firstTimestamp": timestamp(), "lastTimestamp": timestamp(), "eventTime": t, "count": 1,
        "action": reason, "reportingInstance": component,
    }
    try:
        core().create_namespaced_event(ns, body)
    except Exception as e:  # noqa: BLE001 - an event that cannot be written must not stop the work
        log.warning("event %s on %s/%s not written: %s", reason, ns, md.get("name"), e)


# -- leases ------------------------------------------------------------------------------------


def lease_name(node: str) -> str:
    return f"consortium-agent-{node}"


def lease_expired(lease: Any, at: float | None = None) -> bool:
    """True when the holder has not renewed within its lease duration, by the renewTime it wrote
    with its own clock."""
    spec = lease.spec if hasattr(lease, "spec") else None
    if spec is None or spec.renew_time is None:
        return True
    renewed = parse_time(spec.renew_time).timestamp()
    return (at or time.time()) > renewed + float(spec.lease_duration_seconds or 15)


class LeaseClock:
    """Judges Leases by when this process saw them renewed, on its own clock, as Kubernetes' node
    lifecycle controller does: an agent's renewTime is written with the agent's clock, and a laptop
    whose clock is a lease duration behind the operator's looked expired at every renewal (ahead,
    alive for as long after it died). A Lease seen renewed counts as live until it has gone one
    duration without a renewal seen; one not yet seen renewed is judged by its renewTime, and dead
    once unchanged for a duration. Every look in the process (placement, failover, the session's
    node watch) goes through one (LEASES), so renewals are seen as often as anything reads.

    Agents renew through the same API the Leases are read from: one that was away (a control plane
    restarting) or hung (a stopped process, a link dropping packets) left them unrenewed with their
    nodes alive. Readers say when a read failed (`unreachable`) and when one passed (`reachable`, with
    how long it took); for a lease duration after the API answers again, or answers a read that took
    over SLOW_ANSWER_S, no Lease counts as expired, so that its agent can renew it first."""

    SLOW_ANSWER_S = 2.0   # a LIST here takes milliseconds; one held this long, the API was not serving

    def __init__(self):
        self._seen: dict[str, tuple[str, float, bool]] = {}   # namespace/name -> (renewTime, seen since, renewed)
        self._lock = threading.Lock()
        self._away = False   # the last read of the API failed
        self._back_at = float("-inf")   # when a read passed after one failed (monotonic)

    def unreachable(self) -> None:
        self._away = True

    def reachable(self, took_s: float = 0.0) -> None:
        with self._lock:
            if self._away or took_s > self.SLOW_ANSWER_S:
                self._away, self._back_at = False, time.monotonic()

    def expired(self, lease: Any) -> bool:
        spec, md = getattr(lease, "spec", None), getattr(lease, "metadata", None)
        if spec is None or spec.renew_time is None or md is None:
            return True
        key, renew = f"{md.namespace}/{md.name}", str(spec.renew_time)
        duration, now = float(spec.lease_duration_seconds or 15), time.monotonic()
        with self._lock:
            prev = self._seen.get(key)
            if prev is None or prev[0] != renew:
                self._seen[key] = (renew, now, prev is not None)
                if prev is not None:
                    return False   # renewed since the last look: live
        if now - self._back_at <= duration:
            return False
        if prev is None:
            return lease_expired(lease)   # the first look: its renewTime is all there is
        _, since, renewed = prev
        return now - since > duration or (not renewed and lease_expired(lease))


LEASES = LeaseClock()
