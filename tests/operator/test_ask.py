"""`consortium ask` against the operator on a real API server: the session is created, its text
streams to stdout and equals what its status keeps; a session the API server's schema refuses is
not created, and the schema's reason is printed."""
from __future__ import annotations

import subprocess
import sys

import pytest

from consortium import resources as r

pytestmark = pytest.mark.k8s

NS = "tc-ask"


def ask(bed, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "consortium.cli", "ask", *args, "-n", NS,
                           "--kubeconfig", bed.cluster.kubeconfig, "--timeout", "240"],
                          capture_output=True, text=True, timeout=300)


def test_ask_creates_a_session_and_streams_its_text(bed):
    bed.cluster.kubectl("create", "namespace", NS)
    got = ask(bed, "Why is the sky blue?", "--max-tokens", "8", "--name", "why-blue")
    assert got.returncode == 0, got.stderr
    s = bed.api().get_namespaced_custom_object(r.GROUP, r.VERSION, NS, "inferencesessions", "why-blue")
    assert s["status"]["phase"] == "Completed" and len(s["status"]["tokens"]) == 8
    assert got.stdout == s["status"]["text"] + "\n"
    assert "inferencesession tc-ask/why-blue created" in got.stderr
    assert "] Completed\n" in got.stderr and "8 tokens" in got.stderr, got.stderr
    assert [st["layers"] for st in s["spec"]["stages"]] == ["0-9", "10-19", "20-29"]


def test_ask_with_a_stop_sequence_ends_where_the_text_holds_it(bed):
    got = ask(bed, "Explain in one paragraph why the sky appears blue.", "--max-tokens", "40", "--stop", "Rayleigh",
              "--name", "stop-at-rayleigh")
    assert got.returncode == 0, got.stderr
    st = bed.api().get_namespaced_custom_object(r.GROUP, r.VERSION, NS, "inferencesessions", "stop-at-rayleigh")["status"]
    assert st["report"]["stopped"] == "stop_sequence" and len(st["tokens"]) < 40
    assert got.stdout == st["text"] + "\n" and "Rayleigh" in got.stdout
    assert 'Completed: stopped at "Rayleigh"' in got.stderr, got.stderr


def test_ask_prints_the_schemas_reason_for_a_session_it_refuses(bed):
    got = ask(bed, "Hello", "--layers", "5-29", "--name", "starts-late")
    assert got.returncode == 2
    assert "the API server refused the session: 422" in got.stderr and "layer 0" in got.stderr, got.stderr
    names = [o["metadata"]["name"] for o in bed.api().list_namespaced_custom_object(
        r.GROUP, r.VERSION, NS, "inferencesessions")["items"]]
    assert "starts-late" not in names


def test_following_a_session_that_does_not_exist_says_so(bed):
    got = subprocess.run([sys.executable, "-m", "consortium.cli", "follow", "no-such", "-n", NS,
                          "--kubeconfig", bed.cluster.kubeconfig], capture_output=True, text=True, timeout=60)
    assert got.returncode == 2 and "inferencesession tc-ask/no-such not found" in got.stderr
