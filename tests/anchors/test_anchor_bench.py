"""The anchor benchmark, small: the delaying proxy really forwards, and `consortium bench` with tiny
settings runs every section it can here and writes every headline figure with a sane value."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from consortium import netlab
from consortium.anchors import llamarpc
from consortium.anchors.bench import Proxies
from consortium.layers import even_split


def _echo_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve():
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_proxy_forwards_every_byte_and_adds_the_round_trip():
    srv = _echo_server()
    payload = bytes(range(256)) * 1000
    with Proxies([f"127.0.0.1:{srv.getsockname()[1]}"], 20.0) as px:
        host, port = px.endpoints[0].rsplit(":", 1)
        with socket.create_connection((host, int(port))) as c:
            t0 = time.perf_counter()
            c.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += c.recv(65536)
            rtt_ms = (time.perf_counter() - t0) * 1000
    srv.close()
    assert got == payload
    assert rtt_ms >= 40.0   # 20 ms each way is a floor the proxy enforces, whatever the load


def test_proxy_refuses_bad_arguments():
    p = subprocess.run([sys.executable, "-m", "consortium.netlab", "nohost", "127.0.0.1:1", "5"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "HOST:PORT" in p.stderr


def test_tensor_split_counts_the_output_layer_on_the_last_stage():
    assert llamarpc.tensor_split(even_split(30, 3)) == "10/10/11"


def test_bench_rejects_bad_settings():
    for args in (["--rtts", "1,x"], ["--split", "0-9,10-29"], ["--concurrent", "9"], ["--tokens", "1"]):
        p = subprocess.run([sys.executable, "-m", "consortium.cli", "bench", *args], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode != 0 and "consortium bench:" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.timeout(300)
def test_tiny_anchor_bench_writes_every_headline(tmp_path):
    out = tmp_path / "not-yet" / "bench.json"   # its folder is made, not a FileNotFoundError at the end
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    p = subprocess.run([sys.executable, "-m", "consortium.cli", "bench", "--tokens", "6", "--prompt-tokens", "8",
                        "--rounds", "1", "--rtts", "0,4", "--distance-tokens", "3", "--failover-runs", "1",
                        "--failover-contexts", "", "--concurrent", "2", "--json", str(out),
                        "--report", str(tmp_path / "report")], capture_output=True, text=True, timeout=280,
                       env={**os.environ, "TMPDIR": str(scratch)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert not list(scratch.glob("consortium-bench-*"))   # the agents' folders (keys included) are gone
    res = json.loads(out.read_text())
    h = res["headline"]
    for k in ("loopback_over_single", "inprocess_over_single", "commit_share", "audit20_cpu_ratio",
              "audit20_added_share", "audit20_replay_cpu_ratio", "audit20_original_cpu_ratio",
              "concurrent_over_single", "commit_share_signing_per_window",
              "loopback_signing_per_window_over_single", "loopback_driver_sampling_over_single"):
        assert isinstance(h[k], float), k
    assert 0 < h["loopback_over_single"] < 20 and 0 < h["inprocess_over_single"] < 20
    assert 0 < h["commit_share"] < 1 and 0 < h["commit_share_signing_per_window"] < 1
    assert 0 < h["loopback_signing_per_window_over_single"] < 20
    assert 0 < h["audit20_cpu_ratio"] < 10 and h["audit20_added_share"] > -1
    assert 0 < h["audit20_replay_cpu_ratio"] < 10 and 0 < h["audit20_original_cpu_ratio"] < 10
    # 6 tokens: no decode window may be selected, and then no audit CPU at all
    assert 0 <= h["audit20_state_cpu_ratio"] < 10 and 0 <= h["audit20_state16_cpu_ratio"] < 10
    assert 0 < h["failover_spike_ms"]["median"] <= h["failover_spike_ms"]["max"] < 60_000
    assert h["concurrent_sessions"] == 2 and h["concurrent_over_single"] > 0
    b = h["loopback_breakdown_ms"]
    # Each part is a median over the decode steps of a time that lies inside the one before it: the
    # token's, the driver's per stage, the agent's own.
    assert 0 < b["single_compute_ms"] <= b["single_ms"] and 0 < b["agents_compute_ms"] < b["ours_ms"]
    assert 0 < b["hops_ms"] < b["ours_ms"] and 0 <= b["driver_ms"] < b["ours_ms"]
    assert b["ours_added_ms"] == round(b["ours_ms"] - b["single_ms"], 3)
    assert (b["rpc_added_ms"] is None) == (h["rpc_over_single"] is None)
    assert [m["layers"] for m in h["memory_per_stage"]] == ["0-9", "10-19", "20-29"]
    assert all(m["rss_mib"] > 0 and m["weights_mib"] > 0 for m in h["memory_per_stage"])
    bins, _ = llamarpc.bin_dir()
    if bins is None:
        assert h["rpc_over_single"] is None and "rpc" in res["skipped"]
    else:
        assert 0 < h["rpc_over_single"] < 20
        # llama.cpp's own log shows our split: 0-9, 10-19, 20-29 and the output layer (30) last
        assert sorted(res["rpc"]["loopback"]["placement"]["layers_by_device"].values()) == ["0-9", "10-19", "20-30"]
    if netlab.available() is None:
        rows = res["distance"]["rows"]
        assert [r["rtt_ms"] for r in rows] == [0.0, 4.0] and all(r["ours_tokens_per_s"] > 0 for r in rows)
    else:
        assert "distance" in res["skipped"]
    assert (tmp_path / "report" / "anchors.png").stat().st_size > 10_000
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "| our three agents, loopback (data lanes) |" in md and "Where a generated token's time goes" in md
