"""Placement refuses nodes a person has not approved: a freshly registered ComputeNode gets no stage."""
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
