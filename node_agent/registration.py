"""The agent's side of the control plane: its ComputeNode, its heartbeat Lease, and its stage
assignments.

Two modes, one code path: in the cluster (DaemonSet) the placement labels are copied from the
agent's own Node object (CONSORTIUM_NODE_NAME); bare (the Mac, `node-agent --kubeconfig FILE`) they
come from the agent's flags. Either way the agent states only what it can know: its endpoint, its
public key, its memory, the backend llama.cpp detected. `approved` is left to an admin (the chart's
admission policy refuses it from the agent's ServiceAccount).

Every renewal also reads the StageAssignments: an assignment this agent still serves whose
StageAssignment now names another node or a newer epoch is fenced here, so an agent that comes back
from a partition refuses the old epoch even if no driver could reach it to say so; the ones it does
serve get Loaded/Ready and observedEpoch in their status.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from consortium import kube
from consortium import resources as r
from consortium.wire import pb

log = logging.getLogger("node_agent.registration")

AGENT = "consortium-agent"


def total_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def node_labels(node_name: str) -> dict[str, str]:
    """The consortium.io/* labels of this machine's Node (in-cluster mode)."""
    node = kube.core().read_node(node_name)
    return {k: v for k, v in (node.metadata.labels or {}).items() if k.startswith(f"{r.GROUP}/")}


class Registrar:
    def __init__(self, service, *, name: str, endpoint: str, labels: dict[str, str], namespace: str,
                 lease_seconds: int = 10, renew_seconds: float = 2.0, credentials=None,
                 memory_bytes: int | None = None):
        self.service, self.name, self.endpoint = service, name, endpoint
        self.memory_bytes = memory_bytes or total_memory_bytes()   # what the node offers (node-agent --memory)
        # A bare agent's kubeconfig (node_agent.credentials.Kubeconfig): reloaded when it changes,
        # its token's expiry told in the ComputeNode. None in the cluster, where the kubelet renews.
        self.credentials = credentials
        self._told_expiring: bool | None = None   # the CredentialsExpiring status last written
        self._warned_at = self._refused_at = 0.0
        self.labels, self.namespace = dict(labels), namespace
        self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
        # Each periodic request gives up after this long: one sent just before a partition would
        # otherwise wait for TCP to retransmit it after the heal (15-20 s seen), and the agent would
        # fence its stale stages that much later.
        self.request_timeout_s = max(2.0, 2 * renew_seconds)
        self._stop = threading.Event()
        self._sessions_seen: set[str] = set()   # sessions that had StageAssignments in the API
        self._thread = threading.Thread(target=self._loop, name="registrar", daemon=True)

    # -- ComputeNode ----------------------------------------------------------------------------

    def register(self) -> None:
        from kubernetes.client.exceptions import ApiException

        spec = r.ComputeNodeSpec(endpoint=self.endpoint, public_key=self.service.identity.public_key_text,
                                 memory_bytes=self.memory_bytes, labels=self.labels).to_k8s()
        del spec["approved"]  # never the agent's to say
        body = {"apiVersion": r.API_VERSION, "kind": "ComputeNode", "metadata": {"name": self.name}, "spec": spec}
        api = kube.api()
        try:
            api.create_cluster_custom_object(r.GROUP, r.VERSION, "computenodes", body)
            log.info("registered ComputeNode %s at %s", self.name, self.endpoint)
        except ApiException as e:
            if e.status != 409:
                raise
            api.patch_cluster_custom_object(r.GROUP, r.VERSION, "computenodes", self.name, {"spec": spec})
            log.info("refreshed ComputeNode %s at %s", self.name, self.endpoint)
        build = self.service.build

        def change(status: dict) -> dict:
            status.update({"backend": self.service.backend if self.service.backend in r.ACCELERATORS else "cpu",
                           "llamaCpp": {"version": str(build.get("llama_cpp_python", ""))[:64],
                                        "commit": str(build.get("commit", ""))[:64]},
                           "heartbeatLease": {"namespace": self.namespace, "name": kube.lease_name(self.name)}})
            status["conditions"] = kube.with_condition(status.get("conditions"), "Ready", True, "AgentServing",
                                                       f"agent serving on {self.endpoint}")
            if self.credentials is not None:
                status["conditions"] = self._credentials_condition(status["conditions"])
            return status

        self._update_status(change)

    def _update_status(self, change) -> None:
        """Change this node's ComputeNode status (re-read and retried on a conflict)."""
        api = kube.api()
        kube.update_status(
            lambda: api.get_cluster_custom_object(r.GROUP, r.VERSION, "computenodes", self.name),
            lambda b: api.patch_cluster_custom_object_status(r.GROUP, r.VERSION, "computenodes", self.name, b),
            change)

    # -- credentials (bare agents) --------------------------------------------------------------

    def _credentials_condition(self, conditions: list[dict] | None) -> list[dict]:
        expiring = self.credentials.expiring()
        self._told_expiring = expiring
        return kube.with_condition(conditions, "CredentialsExpiring", expiring,
                                   "TokenExpiring" if expiring else "TokenValid",
                                   f"{self.credentials.describe()} (kubeconfig {self.credentials.path})")

    def tell_credentials(self) -> None:
        """Rewrite CredentialsExpiring when it no longer says what is true (the warning time reached,
        a new token loaded), and warn in the log hourly while the token is about to lapse."""
        creds = self.credentials
        if creds is None:
            return
        expiring = creds.expiring()
        if expiring and time.monotonic() - self._warned_at > 3600:
            self._warned_at = time.monotonic()
            log.warning("%s: write the agent a new kubeconfig at %s before then (docs/runbook.md, section 3)",
                        creds.describe(), creds.path)
        if expiring == self._told_expiring:
            return

        def change(status: dict) -> dict:
            status["conditions"] = self._credentials_condition(status.get("conditions"))
            return status

        self._update_status(change)

    def _refused(self, e: BaseException) -> bool:
        """Log a refused token (401) with what to do, once a minute; True if it was one."""
        if self.credentials is None or not kube.is_status(e, 401):
            return False
        if time.monotonic() - self._refused_at > 60:
            self._refused_at = time.monotonic()
            log.error("%s", self.credentials.refused_hint())
        return True

    # -- Lease ----------------------------------------------------------------------------------

    def renew_lease(self) -> None:
        from kubernetes.client.exceptions import ApiException

        co = kube.coordination()
        name = kube.lease_name(self.name)
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": self.lease_seconds,
                "renewTime": kube.micro_time()}
        try:
            co.patch_namespaced_lease(name, self.namespace, {"spec": spec}, _request_timeout=self.request_timeout_s)
        except ApiException as e:
            if e.status != 404:
                raise
            co.create_namespaced_lease(self.namespace, {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": self.namespace, "labels": {"app.kubernetes.io/component": "agent"}},
                "spec": {**spec, "acquireTime": kube.micro_time()}}, _request_timeout=self.request_timeout_s)

    # -- StageAssignments -----------------------------------------------------------------------

    def reconcile_assignments(self) -> None:
        api = kube.api()
        items = api.list_cluster_custom_object(r.GROUP, r.VERSION, "stageassignments",
                                               _request_timeout=self.request_timeout_s).get("items", [])
        self._release_ended({sid for sa in items for sid in _session_ids(sa)})
        held = self.service.held()  # (session, stage) -> epoch
        for sa in items:
            spec = sa.get("spec") or {}
            stage = int(spec.get("stageIndex", -1))
            key = next(((sid, stage) for sid in _session_ids(sa) if (sid, stage) in held), None)
            epoch = int(spec.get("epoch", 0))
            mine = spec.get("nodeName") == self.name
            have = held.get(key)
            if have is None:
                continue
            if not mine or have < epoch:
                # The stage moved on without us: refuse its old epoch from now on.
                fence_at = epoch if not mine else epoch
                self.service.Fence(pb.FenceRequest(ref=pb.StageRef(session=key[0], stage=key[1], epoch=fence_at)),
                                   _NoContext())
                log.warning("fenced %s stage %d below epoch %d (assignment is %s@%d)", key[0], key[1], fence_at,
                            spec.get("nodeName"), epoch)
                continue
            if have == epoch and (sa.get("status") or {}).get("observedEpoch") != epoch:
                self._report_loaded(sa, epoch)

    def _release_ended(self, listed: set[str]) -> None:
        """A session whose StageAssignments were all deleted (the session was) gives back its
        sequence slots; without this an agent refuses new sessions once its few slots are used.
        Only sessions seen with assignments count: one loaded before its assignment appears is kept."""
        for session in sorted((self._sessions_seen - listed) & self.service.sessions()):
            n = self.service.release_session(session)
            log.info("session %s is gone: released %d sequence slot(s)", session, n)
        self._sessions_seen = listed

    def _report_loaded(self, sa: dict, epoch: int) -> None:
        api = kube.api()
        ns, name = sa["metadata"]["namespace"], sa["metadata"]["name"]

        def change(status: dict) -> dict:
            status["observedEpoch"] = epoch
            status["endpoint"] = self.endpoint
            c = kube.with_condition(status.get("conditions"), "Loaded", True, "LayersLoaded",
                                    f"{self.name} holds the layers at epoch {epoch}")
            status["conditions"] = kube.with_condition(c, "Fenced", False, "CurrentEpoch", "")
            return status

        kube.update_status(
            lambda: api.get_namespaced_custom_object(r.GROUP, r.VERSION, ns, "stageassignments", name),
            lambda b: api.patch_namespaced_custom_object_status(r.GROUP, r.VERSION, ns, "stageassignments", name, b),
            change)

    # -- loop -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Register and take the Lease, then keep both up in the background. An API server that
        cannot be reached yet (starting, restarting, the chart not installed: 404) is waited for,
        saying so, as a kubelet waits: a bare agent started first must not just exit."""
        delay = 1.0
        while True:
            try:
                self.register()
                self.renew_lease()
                break
            except Exception as e:  # noqa: BLE001 - sorted below
                if not (kube.transient(e) or getattr(e, "status", None) == 404):
                    raise
                if not self._refused(e):
                    hint = " (are the chart's CRDs installed?)" if getattr(e, "status", None) == 404 else ""
                    log.warning("control plane not reachable: %s%s; registering again in %.0f s", kube.reason(e),
                                hint, delay)
                if self._stop.wait(delay):
                    return
                if self.credentials is not None and self.credentials.reload_if_changed():
                    delay = 1.0
                    continue
                delay = min(2 * delay, 30.0)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.renew_seconds):
            if self.credentials is not None and self.credentials.reload_if_changed():
                self._told_expiring = None   # the new token's expiry goes into the ComputeNode
            try:
                self.renew_lease()
                self.reconcile_assignments()
                self.tell_credentials()
            except Exception as e:  # noqa: BLE001 - the API server may be away for a while; keep serving
                if not self._refused(e):
                    log.warning("control plane unreachable: %s", e)

    def stop(self) -> None:
        self._stop.set()


class _NoContext:
    """Stands in for a gRPC context when the agent calls its own handlers."""

    in_process = True   # not a network caller: no certificate to check

    def abort(self, code, message):
        raise RuntimeError(f"{code.name}: {message}")


def wait_ready(timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kube.api().list_cluster_custom_object(r.GROUP, r.VERSION, "computenodes", limit=1)
            return
        except Exception:  # noqa: BLE001
            time.sleep(0.5)


def _session_ids(sa: dict) -> tuple[str, ...]:
    """The session ids the operator's driver may send for a StageAssignment's session: with the
    uid of the InferenceSession that owns it, and namespace/name alone (an assignment with no
    owner; a session resumed from a state saved before ids carried the uid)."""
    ns, name = sa["metadata"]["namespace"], (sa.get("spec") or {}).get("session", "")
    uids = [o.get("uid") for o in sa["metadata"].get("ownerReferences") or []
            if o.get("kind") == "InferenceSession" and o.get("uid")]
    return tuple(r.session_id(ns, name, uid) for uid in uids[:1]) + (r.session_id(ns, name),)
