"""`consortium ask` and `consortium chat` against the operator on a real API server: the session is
created, its text streams to stdout and equals what its status keeps; a session the API server's
schema refuses is not created, and the schema's reason is printed; a chat's every answer is a
session holding the conversation so far, and Ctrl-C stops an answer the conversation then keeps."""
from __future__ import annotations

import subprocess
import sys

import pytest

from consortium import resources as r
from consortium import testbed

pytestmark = pytest.mark.k8s

NS = "tc-ask"


def ask(bed, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "consortium.cli", "ask", *args, "-n", NS,
                           "--kubeconfig", bed.cluster.kubeconfig, "--timeout", "240"],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(autouse=True, scope="module")
def namespace(bed):
    bed.cluster.kubectl("create", "namespace", NS)


def test_ask_creates_a_session_and_streams_its_text(bed):
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


def _chat_sessions(bed) -> list[dict]:
    items = bed.get("inferencesessions", namespace=NS, selector="consortium.io/created-by=consortium-chat")["items"]
    return sorted(items, key=lambda s: s["metadata"]["creationTimestamp"] + s["metadata"]["name"])


def test_chat_keeps_the_conversation_one_session_per_answer(bed, tmp_path):
    # From a manifest that has a name of its own: each turn is still a session of its own.
    got = subprocess.run([sys.executable, "-m", "consortium.cli", "chat", "-n", NS, "--max-tokens", "6",
                          "--from", str(testbed.ROOT / "manifests/sessions/sky-is-blue.yaml"),
                          "--system", "You are terse.", "--kubeconfig", bed.cluster.kubeconfig],
                         input="Why is the sky blue?\n\nSay it again.\n/exit\n", capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    first, second = _chat_sessions(bed)[-2:]
    answer = first["status"]["text"]
    assert first["spec"]["messages"] == [{"role": "system", "content": "You are terse."},
                                         {"role": "user", "content": "Why is the sky blue?"}]
    assert second["spec"]["messages"] == first["spec"]["messages"] + [
        {"role": "assistant", "content": answer}, {"role": "user", "content": "Say it again."}]
    assert got.stdout == answer + "\n" + second["status"]["text"] + "\n"
    assert got.stderr.count("[Completed, 6 tokens") == 2, got.stderr


def test_ctrl_c_in_chat_stops_the_answer_and_the_conversation_keeps_it(bed, tmp_path):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "consortium.cli", "chat", "-n", NS, "--max-tokens", "500",
                             "--kubeconfig", bed.cluster.kubeconfig], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        seen = {s["metadata"]["name"] for s in _chat_sessions(bed)}
        proc.stdin.write("Write the numbers from 1 to 300 in words, separated by commas.\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        while not (new := [s for s in _chat_sessions(bed) if s["metadata"]["name"] not in seen]) or \
                ((new[0].get("status") or {}).get("position") or 0) < 3:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)   # as Ctrl-C in the terminal
        name = new[0]["metadata"]["name"]
        while (bed.session(name, NS).get("status") or {}).get("phase") != "Completed":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        proc.stdin.write("Thanks.\n/exit\n")
        proc.stdin.close()
        assert proc.wait(120) == 0, proc.stderr.read()
    finally:
        proc.kill()
    stopped = bed.session(name, NS)["status"]
    assert stopped["report"]["stopped"] == "stop_requested" and len(stopped["tokens"]) < 500
    assert stopped["report"]["stopReason"] == "interrupted in consortium chat"
    after = _chat_sessions(bed)[-1]
    assert after["spec"]["messages"][-2:] == [{"role": "assistant", "content": stopped["text"]},
                                              {"role": "user", "content": "Thanks."}]
