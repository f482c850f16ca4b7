"""Placement refuses nodes a person has not approved: a freshly registered ComputeNode gets no stage."""
import dataclasses

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


def test_a_backup_loads_stages_ahead_only_while_its_memory_holds_them():
    """KubePolicy.likely_backup: the backup a failover would pick, unless the layers it would hold
    ahead, beside the stages it serves, pass the memory its ComputeNode declares."""
    import types

    from consortium import testbed
    from consortium_operator import failover

    spec = r.InferenceSessionSpec.model_validate(testbed.sky_is_blue(8)["spec"])
    n0 = dataclasses.replace(view("n0", True), memory_bytes=250, labels=dict(testbed.NODE_LABELS["n0"]))
    others = [dataclasses.replace(view(n, True), labels=dict(testbed.NODE_LABELS[n])) for n in ("n1", "n2")]

    class Policy(failover.KubePolicy):   # the ComputeNodes as the API would list them
        def _usable(self, candidates):
            return [v for v in [n0, *others] if v.name in candidates]

    p = Policy({"metadata": {"name": "s", "namespace": "ns"}}, spec, None, lambda *a, **k: None)
    p.driver = types.SimpleNamespace(state=types.SimpleNamespace(nodes=["n1", "n2", "n0"]))
    p.stage_bytes = [100, 100, 100]   # n0 serves stage 2: 100 of its 250
    assert p.likely_backup(0, "n1", ["n0", "n2"]) == "n0"   # 200
    assert p.likely_backup(1, "n2", ["n0", "n1"]) is None   # 300 > 250: not loaded ahead
    n0 = dataclasses.replace(n0, memory_bytes=0)             # memory not declared: no limit known
    assert p.likely_backup(1, "n2", ["n0", "n1"]) == "n0"
