"""Stages whose layers are 'auto': the operator splits the model over the nodes it placed the stages
on, in proportion to the memory each ComputeNode declares (node-agent --memory), writes the split in
status.layers and the StageAssignments, and the session gives the single node's tokens; a split
that fits no node waits, saying so."""
from __future__ import annotations

import argparse
import json

import pytest

from consortium import receipt_check, session_report, testbed
from consortium import resources as r
from consortium.layers import format_split, weighted_split
from node_agent.main import memory_size

NS = "tc-auto-layers"


def test_node_agent_reads_memory_sizes():
    assert memory_size("12GiB") == 12 << 30 and memory_size("512M") == 512 << 20 and memory_size("8g") == 8 << 30
    assert memory_size("1.5GiB") == 3 << 29 and memory_size("4096") == 4096 and memory_size("64 kib") == 64 << 10
    for bad in ("", "twelve", "12 GB of RAM", "-1G", "0"):
        with pytest.raises(argparse.ArgumentTypeError, match="cannot read memory size"):
            memory_size(bad)


def _set_memory(bed, node: str, value: int) -> None:
    bed.api().patch_cluster_custom_object(r.GROUP, r.VERSION, "computenodes", node, {"spec": {"memoryBytes": value}})


@pytest.mark.k8s
def test_auto_layers_split_by_the_nodes_memory(bed, baseline):
    bed.cluster.kubectl("create", "namespace", NS)
    memory = {n: int(bed.get("computenodes", n)["spec"]["memoryBytes"]) for n in testbed.NODE_LABELS}
    try:
        # The node the Metal stage lands on (n2, the only one labeled metal) offers half as much.
        _set_memory(bed, "n2", memory["n2"] // 2)
        body = testbed.sky_is_blue(testbed.TEST_MAX_TOKENS, "auto-split")
        for stage in body["spec"]["stages"]:
            stage["layers"] = "auto"
        bed.cluster.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(body))
        done = bed.wait_phase("auto-split", NS, ("Completed", "Failed"), 300)
        st = done["status"]
        assert st["phase"] == "Completed", st.get("conditions")
        nodes = st["report"]["driverState"]["nodes"]
        assert nodes == ["n1", "n2", "n0"]   # the manifest's selectors, as with written ranges
        want = format_split(weighted_split(30, [memory["n1"], memory["n2"] // 2, memory["n0"]])).split(",")
        assert st["layers"] == want and want[1] != "10-19"   # the halved node holds fewer layers
        assert done["spec"]["stages"][0]["layers"] == "auto"   # the spec stays as written
        placed = next(c for c in st["conditions"] if c["type"] == "Scheduled")
        assert f"stage 1 (layers {want[1]}) -> n2" in placed["message"], placed
        for i, layers in enumerate(want):
            assignment = bed.get("stageassignments", r.StageAssignment.name_for("auto-split", i), NS)
            assert assignment["spec"]["layerRange"] == layers and assignment["spec"]["nodeName"] == nodes[i]
        assert st["tokens"] == baseline   # another split, the single node's tokens all the same
        receipts = bed.get("receipts", namespace=NS, selector=f"{r.GROUP}/session=auto-split")["items"]
        checked = receipt_check.check(done, receipts, bed.get("computenodes")["items"])
        assert checked["ok"] and checked["complete"], receipt_check.lines(checked)
        shown = session_report.build(done, receipts, bed.get("computenodes")["items"])
        assert [s["layers"] for s in shown["stages"]] == want

        # A model that fits none of the chosen nodes' declared memory waits with the reason.
        for n in testbed.NODE_LABELS:
            _set_memory(bed, n, 16 << 20)
        bed.cluster.kubectl("apply", "-n", NS, "-f", "-",
                            input=json.dumps({**body, "metadata": {"name": "auto-too-big"}}))

        def waiting():
            s = bed.session("auto-too-big", NS).get("status") or {}
            cond = next((c for c in s.get("conditions") or [] if c["type"] == "Scheduled"), None)
            return cond if cond and cond["status"] == "False" and "does not fit" in cond["message"] else None
        cond = testbed.wait_until(waiting, 120, "the too-big session waiting for memory")
        assert cond["reason"] == "Unschedulable" and "n2 would hold about" in cond["message"], cond
        for n, value in memory.items():
            _set_memory(bed, n, value)
        assert bed.wait_phase("auto-too-big", NS, ("Completed", "Failed"), 300)["status"]["phase"] == "Completed"
    finally:
        for n, value in memory.items():
            _set_memory(bed, n, value)
