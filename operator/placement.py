"""Placement: which ComputeNode runs each stage of a session.

A node can take a stage when an admin approved it, its agent reports Ready and renews its Lease, it
is not Quarantined, its labels match the stage's nodeSelector, and its memory holds the stages put
on it (the weights the stage loads, from the model's tensor index; KV comes on top). Stages
are placed most-constrained first, each on the matching node with the fewest stages of this session,
so the seed's roles come out as written (stage 1 on the only Metal node, stage 2 on the coordinator,
stage 0 on the other CUDA worker). When nothing fits, the reasons per stage are returned and the
session waits with a condition saying them. Stages whose layers are 'auto' are placed the same way,
then given the model's layers in proportion to their nodes' declared memory (`memory_split`).

The backend a node detected is shown beside its accelerator label, never replaced by it.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Any, Callable

from consortium import kube
from consortium import resources as r
from consortium.layers import LayerRange, format_split, weighted_split
from node_agent.engine.slicing import ModelInfo, stage_weight_bytes

log = logging.getLogger("consortium.operator.placement")


@dataclasses.dataclass(frozen=True)
class NodeView:
    name: str
    labels: dict
    approved: bool
    ready: bool
    quarantined: bool
    lease_ok: bool
    backend: str | None
    memory_bytes: int
    endpoint: str
    public_key: str
    llama_commit: str = ""   # the llama.cpp build its agent runs (status.llamaCpp.commit)

    @property
    def shown(self) -> str:
        """'cpu (labeled metal)': what the machine computes on, and what the admin said."""
        label = self.labels.get(r.LABEL_ACCELERATOR)
        b = self.backend or "unknown"
        return b if label in (None, b) else f"{b} (labeled {label})"

    def why_not(self) -> str | None:
        if not self.approved:
            return "not approved"
        if self.quarantined:
            return "quarantined"
        if not self.ready:
            return "agent not Ready"
        if not self.lease_ok:
            return "Lease expired"
        return None


class _Shared:
    """A list read from the API for every session of this process: a reading at most `max_age_s`
    old is given again, and callers that ask while one is being made wait for it and take it if it
    is young enough. Each running session's node watch reads the ComputeNodes and Leases once a
    second and its auditor's verifier choice as often: four LISTs a second a session, unshared."""

    def __init__(self, fetch: Callable[[Any], Any]):
        self._fetch = fetch
        self._lock = threading.Lock()
        self._last: dict[Any, tuple[float, Any]] = {}   # key -> (when it came, the reading)

    def get(self, key: Any, max_age_s: float) -> Any:
        with self._lock:
            last = self._last.get(key)
            if last is not None and time.monotonic() - last[0] <= max_age_s:
                return last[1]
            asked = time.monotonic()
            try:
                value = self._fetch(key)
            except Exception as e:
                if kube.transient(e):
                    kube.LEASES.unreachable()
                raise
            # After an API that was away or slow to answer, its agents get a lease duration to renew.
            kube.LEASES.reachable(time.monotonic() - asked)
            self._last[key] = (time.monotonic(), value)
            return value


_computenodes = _Shared(lambda _: kube.api().list_cluster_custom_object(r.GROUP, r.VERSION, "computenodes")
                        .get("items", []))
_leases = _Shared(lambda ns: {x.metadata.name: x for x in kube.coordination().list_namespaced_lease(ns).items})


def computenodes(max_age_s: float = 0.0) -> list[dict]:
    """Every ComputeNode, from a reading at most `max_age_s` old."""
    return _computenodes.get(None, max_age_s)


def leases(namespace: str, max_age_s: float = 0.0) -> dict[str, Any]:
    """The Leases in `namespace` (the agents' release namespace) by name, from a reading at most
    `max_age_s` old."""
    return _leases.get(namespace, max_age_s)


def node_views(namespace: str | None, max_age_s: float = 0.0) -> list[NodeView]:
    """Every ComputeNode, with its Lease read from `namespace` (the agents' release namespace), from
    readings at most `max_age_s` old."""
    items = computenodes(max_age_s)
    found = {}
    if namespace:
        try:
            found = leases(namespace, max_age_s)
        except Exception:  # noqa: BLE001 - without Lease access, Ready alone decides
            found = {}
    out = []
    for cn in items:
        spec, status = cn.get("spec") or {}, cn.get("status") or {}
        name = cn["metadata"]["name"]
        lease = found.get(kube.lease_name(name))
        out.append(NodeView(
            name=name, labels=dict(spec.get("labels") or {}), approved=bool(spec.get("approved")),
            ready=kube.condition_true(cn, "Ready"), quarantined=kube.condition_true(cn, "Quarantined"),
            lease_ok=(not found) or (lease is not None and not kube.LEASES.expired(lease)),
            backend=status.get("backend"), memory_bytes=int(spec.get("memoryBytes") or 0),
            endpoint=spec.get("endpoint", ""), public_key=spec.get("publicKey", ""),
            llama_commit=str((status.get("llamaCpp") or {}).get("commit") or "")))
    return sorted(out, key=lambda n: n.name)


def mixed_builds(nodes: list[NodeView], names) -> str | None:
    """What to warn of when the named nodes run different llama.cpp builds: stage outputs are
    bit-exact only within one build, so a session across them loses the exact audits and may lose
    the single node's tokens, as across backends. None when they agree (or say nothing)."""
    wanted = set(names)
    by_build: dict[str, list[str]] = {}
    for n in nodes:
        if n.name in wanted and n.llama_commit:
            by_build.setdefault(n.llama_commit, []).append(n.name)
    if len(by_build) <= 1:
        return None
    builds = "; ".join(f"{commit[:12]} on {', '.join(sorted(ns))}" for commit, ns in sorted(by_build.items()))
    return (f"llama.cpp builds differ ({builds}): stage outputs are bit-exact only within one build, so audits "
            f"between these nodes pass within tolerance at best and the tokens may differ from a single node's")


def matches(selector: r.LabelSelector | None, labels: dict) -> bool:
    want = (selector.match_labels if selector else None) or {}
    return all(labels.get(k) == v for k, v in want.items())


def stage_bytes(info: ModelInfo, ranges: list[LayerRange | r.LayerRange]) -> list[int]:
    """The bytes of the weights each stage loads, from the model's tensor index (its blocks; the
    embedding on the first and final stage, the LM head on the final one). KV comes on top."""
    return [stage_weight_bytes(info, LayerRange.parse(str(lr))) for lr in ranges]


def memory_split(chosen: list[str], nodes: list[NodeView], info: ModelInfo) -> tuple[list[LayerRange] | None, str | None]:
    """The layers of stages whose layers are 'auto', placed on `chosen`: in proportion to the memory
    each node declares (shared evenly between the stages one node holds; even where a node declares
    none). None and the reason when a node's share would not fit its memory."""
    memory = {n.name: n.memory_bytes for n in nodes}
    held_stages = collections.Counter(chosen)
    ranges = weighted_split(info.n_layers, [memory.get(c, 0) / held_stages[c] for c in chosen])
    held: dict[str, int] = {}
    for c, b in zip(chosen, stage_bytes(info, ranges)):
        held[c] = held.get(c, 0) + b
    over = [f"{c} would hold about {b >> 20} MiB of its {memory[c] >> 20} MiB" for c, b in sorted(held.items())
            if memory.get(c) and b > memory[c]]
    if over:
        return None, (f"the model split by the memory of the nodes chosen ({format_split(ranges)}) does not "
                      f"fit: {'; '.join(over)}")
    return ranges, None


def place(stages: list[r.Stage], nodes: list[NodeView], need: list[int]) -> tuple[list[str] | None, list[str]]:
    """Node name per stage, or None and one reason per stage that found no node."""
    usable = [n for n in nodes if n.why_not() is None]
    cands = {i: [n for n in usable if matches(s.node_selector, n.labels)] for i, s in enumerate(stages)}
    reasons = []
    for i, s in enumerate(stages):
        if not cands[i]:
            sel = (s.node_selector.match_labels if s.node_selector else None) or {}
            skipped = [f"{n.name}: {n.why_not()}" for n in nodes if matches(s.node_selector, n.labels) and n.why_not()]
            reasons.append(f"stage {i} ({s.layers}): no usable node matches {sel or 'any'}"
                           + (f" ({'; '.join(skipped)})" if skipped else ""))
    if reasons:
        return None, reasons
    load: dict[str, int] = {}
    used: dict[str, int] = {}
    chosen: dict[int, str] = {}
    for i in sorted(cands, key=lambda i: (len(cands[i]), i)):
        fits = [n for n in cands[i] if not n.memory_bytes or used.get(n.name, 0) + need[i] <= n.memory_bytes]
        if not fits:
            reasons.append(f"stage {i} ({stages[i].layers}): needs about {need[i] >> 20} MiB, no matching node "
                           f"has that much left")
            continue
        n = min(fits, key=lambda n: (load.get(n.name, 0), n.name))
        chosen[i] = n.name
        load[n.name] = load.get(n.name, 0) + 1
        used[n.name] = used.get(n.name, 0) + need[i]
    if reasons:
        return None, reasons
    return [chosen[i] for i in range(len(stages))], []


def assignment_body(session: dict, index: int, stage: r.Stage, node: str, epoch: int, model: dict) -> dict:
    md = session["metadata"]
    lr = stage.layer_range
    spec = r.StageAssignmentSpec(session=md["name"], stage_index=index, layers=lr, node_name=node, epoch=epoch,
                                 model=r.ModelRef.model_validate(model)).to_k8s()
    return {"apiVersion": r.API_VERSION, "kind": "StageAssignment",
            "metadata": {"name": r.StageAssignment.name_for(md["name"], index), "namespace": md["namespace"],
                         "labels": {f"{r.GROUP}/session": md["name"]},
                         "ownerReferences": [{"apiVersion": r.API_VERSION, "kind": "InferenceSession",
                                              "name": md["name"], "uid": md["uid"], "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": spec}


def write_assignment(session: dict, index: int, stage: r.Stage, node: str, epoch: int, model: dict) -> dict:
    """Create StageAssignment <session>-s<i>, or rewrite its node and epoch (failover)."""
    from kubernetes.client.exceptions import ApiException

    from kubernetes import client

    body = assignment_body(session, index, stage, node, epoch, model)
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    api = kube.api()
    try:
        return api.create_namespaced_custom_object(r.GROUP, r.VERSION, ns, "stageassignments", body)
    except ApiException as e:
        if e.status != 409:
            raise
    old = api.get_namespaced_custom_object(r.GROUP, r.VERSION, ns, "stageassignments", name)
    if not kube.owned_by(old, session["metadata"]["uid"]):
        # A deleted namesake's, not collected yet (the garbage collector took over 20 s on the test
        # control plane): taken over, it would be collected later under this session, and its agent
        # would release the stage mid-generation. Removed, and this session's made in its place.
        log.info("stage assignment %s/%s belongs to a deleted session of the same name: replaced", ns, name)
        try:
            api.delete_namespaced_custom_object(r.GROUP, r.VERSION, ns, "stageassignments", name,
                                                body=client.V1DeleteOptions(preconditions=client.V1Preconditions(
                                                    uid=old["metadata"]["uid"])))
        except ApiException as e:
            if e.status not in (404, 409):   # collected meanwhile, or replaced by someone else
                raise
        return api.create_namespaced_custom_object(r.GROUP, r.VERSION, ns, "stageassignments", body)
    return api.patch_namespaced_custom_object(r.GROUP, r.VERSION, ns, "stageassignments", name,
                                              {"spec": {"nodeName": node, "epoch": epoch}})


def read_assignments(namespace: str, session: str, n: int, uid: str) -> list[dict | None]:
    """The session's StageAssignments by stage (None where there is none, or only a deleted
    namesake's)."""
    from kubernetes.client.exceptions import ApiException

    out = []
    for i in range(n):
        try:
            sa = kube.api().get_namespaced_custom_object(
                r.GROUP, r.VERSION, namespace, "stageassignments", r.StageAssignment.name_for(session, i))
            out.append(sa if kube.owned_by(sa, uid) else None)
        except ApiException as e:
            if e.status != 404:
                raise
            out.append(None)
    return out
