"""Placement refuses nodes a person has not approved: a freshly registered ComputeNode gets no stage;
it says when the nodes a session may use run different llama.cpp builds."""
import dataclasses
import json

import pytest

from consortium import resources as r
from consortium_operator import placement


def view(name: str, approved: bool) -> placement.NodeView:
    return placement.NodeView(name=name, labels={r.LABEL_ACCELERATOR: "cuda"}, approved=approved, ready=True,
                              quarantined=False, lease_ok=True, backend="cpu", memory_bytes=0,
                              endpoint="10.0.0.1:50051", public_key="0fT6pV3b9dEwFz3m2p6s8b1xQk2o9u7c4a5Wm3nYt1A=")


def test_unapproved_node_gets_no_stage_until_approved():
    stages = [r.Stage(layers="0-14"), r.Stage(layers="15-29")]
    chosen, reasons = placement.place(stages, [view("fresh", False)], [1, 1])
    assert chosen is None and all("fresh: not approved" in x for x in reasons) and len(reasons) == 2
    chosen, _ = placement.place(stages, [view("fresh", False), view("old", True)], [1, 1])
    assert chosen == ["old", "old"]
    chosen, _ = placement.place(stages, [view("fresh", True), view("old", True)], [1, 1])
    assert sorted(chosen) == ["fresh", "old"]



def test_nodes_on_different_llama_cpp_builds_are_named_with_the_consequence():
    a, b, c = (dataclasses.replace(view(n, True), llama_commit=commit)
               for n, commit in (("a", "4f1c2d3e5a6b7c8d"), ("b", "4f1c2d3e5a6b7c8d"), ("c", "9e8d7c6b5a4f3e2d")))
    assert placement.mixed_builds([a, b, c], ["a", "b"]) is None
    warning = placement.mixed_builds([a, b, c], ["a", "b", "c"])
    assert warning.startswith("llama.cpp builds differ (4f1c2d3e5a6b on a, b; 9e8d7c6b5a4f on c)")
    assert "bit-exact only within one build" in warning
    assert placement.mixed_builds([a, dataclasses.replace(c, llama_commit="")], ["a", "c"]) is None   # unknown


def test_auto_layers_follow_the_memory_each_chosen_node_declares():
    """Stages whose layers are 'auto': the model's layers in proportion to the memory of the nodes the
    stages landed on (a node holding two stages shares its memory between them), even where a node
    declares none, and refused with the nodes it would not fit, counting the weights each stage loads."""
    from consortium.layers import format_split, weighted_split
    from node_agent.engine.slicing import ModelInfo

    gib, mib = 1 << 30, 1 << 20

    def model(block: int) -> ModelInfo:   # Llama-3-8B's shape: 32 blocks, a 128k vocabulary, untied head
        return ModelInfo(path="m.gguf", architecture="llama", n_layers=32, n_embd=4096, n_vocab=128256,
                         tied_output=False, file_type="Q4_K_M", block_bytes=(block,) * 32, embd_bytes=280 * mib,
                         output_bytes=420 * mib, other_bytes=mib)

    nodes = [dataclasses.replace(view(n, True), memory_bytes=m) for n, m in (("a", 24 * gib), ("b", 16 * gib),
                                                                             ("c", 8 * gib))]
    stages = [r.Stage(layers="auto") for _ in range(3)]
    chosen, _ = placement.place(stages, nodes, [0, 0, 0])
    assert chosen == ["a", "b", "c"]
    ranges, why = placement.memory_split(chosen, nodes, model(150 * mib))
    assert why is None and format_split(ranges) == "0-15,16-26,27-31"   # 16 : 11 : 5 layers for 24 : 16 : 8
    assert placement.stage_bytes(model(150 * mib), ranges) == [(16 * 150 + 280 + 1) * mib, (11 * 150 + 1) * mib + 4 * 4096,
                                                               (5 * 150 + 280 + 420 + 1) * mib]
    ranges, _ = placement.memory_split(["a", "a", "c"], nodes, model(150 * mib))
    assert format_split(ranges) == "0-11,12-23,24-31"                     # a's 24 GiB shared by two stages
    unknown = [dataclasses.replace(n, memory_bytes=0) if n.name == "b" else n for n in nodes]
    assert format_split(placement.memory_split(chosen, unknown, model(mib))[0]) == "0-10,11-21,22-31"
    ranges, why = placement.memory_split(chosen, nodes, model(2 * gib))
    assert ranges is None and "does not fit" in why and "a would hold about 33049 MiB of its 24576 MiB" in why
    assert format_split(weighted_split(30, [1, 1, 1])) == "0-9,10-19,20-29"
    assert format_split(weighted_split(4, [100, 1, 1, 1])) == "0-0,1-1,2-2,3-3"   # one layer at least each


def test_auto_stages_are_all_or_none_and_resolved_by_the_operator():
    spec = r.InferenceSessionSpec(model=r.ModelRef(name="m", file="m.gguf"), prompt="hi",
                                  stages=[r.Stage(layers="auto"), r.Stage(layers="auto")])
    assert spec.auto_split
    with pytest.raises(ValueError, match="the operator chooses them"):
        spec.stages[0].layer_range
    with pytest.raises(ValueError, match="or none"):
        r.InferenceSessionSpec(model=r.ModelRef(name="m", file="m.gguf"), prompt="hi",
                               stages=[r.Stage(layers="0-9"), r.Stage(layers="auto")])


def test_a_verifier_choice_waits_at_most_a_second_for_an_api_that_hangs(monkeypatch):
    """A hung API server answers a LIST only after the client's read timeout: the auditor's verifier
    choice takes the last good reading after VERIFIER_READ_WAIT_S, while one read goes on behind it."""
    import threading
    import time

    from consortium import testbed
    from consortium_operator import failover

    spec = r.InferenceSessionSpec.model_validate(testbed.sky_is_blue(8)["spec"])
    p = failover.KubePolicy({"metadata": {"name": "s", "namespace": "ns"}}, spec, None, lambda *a, **k: None)
    answer, reads = threading.Event(), []

    def node_views(namespace, max_age_s):
        reads.append(max_age_s)
        if len(reads) > 1:
            answer.wait(30)   # hung until the test lets it answer: node a has gone meanwhile
            return [view("b", True)]
        return [view("a", True), view("b", True)]
    monkeypatch.setattr(failover.placement, "node_views", node_views)
    candidates = ["a", "b", "worker"]
    assert p.choose_verifier(0, "worker", candidates) == "a"
    time.sleep(failover.VERIFIER_VIEWS_MAX_AGE_S + 0.05)   # that reading is now too old
    t0 = time.monotonic()
    assert p.choose_verifier(0, "worker", candidates) == "a"   # from it, after waiting for a new one
    assert p.choose_verifier(0, "worker", candidates) == "a"   # the read still hangs: not asked again
    waited = time.monotonic() - t0
    assert 2 * failover.VERIFIER_READ_WAIT_S - 0.1 < waited < 2 * failover.VERIFIER_READ_WAIT_S + 1.0, waited
    assert len(reads) == 2
    answer.set()
    p._reader.join(5)
    assert p.choose_verifier(0, "worker", candidates) == "b"   # the API answers again


@pytest.mark.k8s
def test_a_backup_loads_stages_ahead_only_while_its_memory_holds_them(cluster):
    """KubePolicy.likely_backup: the backup a failover would pick, unless the layers it would hold
    ahead, beside the stages it serves, pass the memory its ComputeNode declares. The ComputeNodes
    are in a real API server, labeled for this test's backup selector alone."""
    import json
    import types
    from pathlib import Path

    from kubernetes import client, config

    from consortium import kube, testbed
    from consortium_operator import failover

    root = Path(__file__).resolve().parents[2]
    cluster.kubectl("apply", "-f", str(root / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/computenodes.{r.GROUP}")
    pool = {"consortium.io/test-pool": "memory"}
    names = {"mem-0": 250, "mem-1": 0, "mem-2": 0}   # 0: memory not declared

    def node(name: str, memory: int) -> None:
        spec = {"endpoint": "10.0.0.1:50051", "publicKey": view(name, True).public_key,
                "labels": pool, "approved": True, **({"memoryBytes": memory} if memory else {})}
        cluster.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": r.API_VERSION, "kind": "ComputeNode", "metadata": {"name": name}, "spec": spec}))
        kube.api().patch_cluster_custom_object_status(r.GROUP, r.VERSION, "computenodes", name, {"status": {
            "conditions": kube.with_condition([], "Ready", True, "Test")}})

    old = client.Configuration.get_default_copy()
    config.load_kube_config(config_file=cluster.kubeconfig)
    try:
        for name, memory in names.items():
            node(name, memory)
        body = testbed.sky_is_blue(8)
        body["spec"]["failover"] = {"backupSelector": {"matchLabels": pool}}
        spec = r.InferenceSessionSpec.model_validate(body["spec"])
        p = failover.KubePolicy({"metadata": {"name": "s", "namespace": "ns"}}, spec, None, lambda *a, **k: None)
        p.driver = types.SimpleNamespace(state=types.SimpleNamespace(nodes=["mem-1", "mem-2", "mem-0"]))
        p.stage_bytes = [100, 100, 100]   # mem-0 serves stage 2: 100 of its 250
        assert p.likely_backup(0, "mem-1", ["mem-0", "mem-2"]) == "mem-0"   # 200
        assert p.likely_backup(1, "mem-2", ["mem-0", "mem-1"]) is None      # 300 > 250: not loaded ahead
        node("mem-0", 0)                                                     # memory no longer declared
        assert p.likely_backup(1, "mem-2", ["mem-0", "mem-1"]) == "mem-0"
    finally:
        cluster.kubectl("delete", "computenode", *names, "--ignore-not-found", check=False)
        client.Configuration.set_default(old)


def test_a_session_across_llama_cpp_builds_is_warned_of(bed, baseline):
    """One agent's ComputeNode says another build (as a node updated on its own would): the session
    still runs, its Scheduled condition and a MixedBuilds Event say which nodes run which build."""
    from consortium import testbed

    node = bed.get("computenode", "n2")
    real = node["status"]["llamaCpp"]["commit"]
    patch = lambda commit: bed.cluster.kubectl(   # noqa: E731
        "patch", "computenode", "n2", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"llamaCpp": {"commit": commit}}}))
    ns = "tc-builds"
    bed.cluster.kubectl("create", "namespace", ns)
    patch("0123456789abcdef")
    try:
        bed.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(testbed.sky_is_blue(4, "mixed")))
        s = bed.wait_phase("mixed", ns, ("Completed", "Failed"), 180)
    finally:
        patch(real)
    scheduled = next(c for c in s["status"]["conditions"] if c["type"] == "Scheduled")
    msg = scheduled["message"]
    assert "llama.cpp builds differ" in msg and "0123456789ab on n2" in msg and f"{real[:12]} on n0, n1" in msg, msg
    assert "MixedBuilds" in [e["reason"] for e in bed.events(ns, "mixed")]
    assert s["status"]["phase"] == "Completed"
