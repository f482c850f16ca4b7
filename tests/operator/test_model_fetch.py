"""A session whose model is named by URL, through the operator on a real API server: the operator reads
its header alone, the agents fetch the file (one download here, where they share a cache), pinned by
its sha256, and vouch for the header the operator read; the session's tokens are the single node's.
A pin the bytes do not match fails the session saying both digests, and so does a server that gives
the operator another header than the nodes' file."""
from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from consortium import fetch, kube, testbed
from consortium.models import resolve_model
from consortium.testbed import TEST_MAX_TOKENS as MAX_TOKENS
from node_agent.engine.slicing import sha256_file

pytestmark = pytest.mark.k8s

NS = "tc-fetch"
TAMPERED = "-tampered"   # a URL holding it gives the same file, its header changed for Range requests


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Files of a folder, each GET counted with its Range header; `Range: bytes=A-B` answered 206 with
    those bytes, as any real file server does."""
    gets: list[tuple[str, str | None]] = []

    def translate_path(self, path):
        return super().translate_path(path.replace(TAMPERED, ""))

    def do_GET(self):
        asked = self.headers.get("Range")
        CountingHandler.gets.append((self.path, asked))
        path = Path(self.translate_path(self.path))
        if not asked or not asked.startswith("bytes=0-") or not asked[8:].isdigit() or not path.is_file():
            super().do_GET()
            return
        size = path.stat().st_size
        end = min(int(asked[8:]), size - 1)
        with open(path, "rb") as f:
            data = f.read(end + 1)
        if TAMPERED in self.path:   # the first bytes alone changed: a letter of general.name's value
            at = data.index(b"general.name") + len(b"general.name") + 4 + 8   # value type, string length
            data = data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1:]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes 0-{end}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(bed):
    model = resolve_model(None)
    handler = functools.partial(CountingHandler, directory=str(model.parent))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    bed.cluster.kubectl("create", "namespace", NS)
    url = f"http://127.0.0.1:{srv.server_address[1]}/{model.name}"
    sha = sha256_file(model)
    fetched = fetch.local_path(url, sha).parent   # the cache the operator and agents share here
    shutil.rmtree(fetched, ignore_errors=True)
    yield url, sha
    shutil.rmtree(fetched, ignore_errors=True)
    srv.shutdown()
    srv.server_close()


def session_of(url: str, sha: str, name: str) -> dict:
    body = testbed.sky_is_blue(MAX_TOKENS, name)
    body["spec"]["model"] = {"name": "SmolLM2-135M-Instruct", "file": Path(url).name, "source": url, "sha256": sha}
    return body


def test_a_model_named_by_url_is_fetched_once_pinned_and_gives_the_single_nodes_tokens(bed, served, baseline):
    url, sha = served
    CountingHandler.gets.clear()
    bed.cluster.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(session_of(url, sha, "by-url")))
    s = bed.wait_phase("by-url", NS, ("Completed",), 300)
    assert s["status"]["tokens"] == baseline
    # The operator read the header alone; one download for the three agents (they share a cache here).
    name = f"/{Path(url).name}"
    assert CountingHandler.gets == [(name, f"bytes=0-{fetch.HEADER_FIRST_READ - 1}"), (name, None)]
    assert fetch.local_path(url, sha).is_file() and fetch.header_path(url, sha).is_file()
    placed = kube.condition(s["status"]["conditions"], "Scheduled")
    assert placed["status"] == "True" and placed["reason"] == "Placed"


def test_ask_runs_any_model_by_url_split_by_the_nodes_memory(bed, served, baseline):
    """`consortium ask --model-url URL --sha256 HEX --stages 2`: no manifest, no layer ranges."""
    url, sha = served
    prompt = testbed.sky_is_blue(MAX_TOKENS)["spec"]["prompt"]
    got = subprocess.run([sys.executable, "-m", "consortium.cli", "ask", prompt, "--model-url", url, "--sha256", sha,
                          "--stages", "2", "--max-tokens", str(MAX_TOKENS), "--name", "ask-by-url", "-n", NS,
                          "--kubeconfig", bed.cluster.kubeconfig, "--timeout", "240"],
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr
    s = bed.session("ask-by-url", NS)
    assert s["spec"]["model"] == {"name": Path(url).stem, "file": Path(url).name, "source": url, "sha256": sha}
    assert [st["layers"] for st in s["spec"]["stages"]] == ["auto", "auto"]
    assert s["status"]["layers"] == ["0-14", "15-29"]   # the agents here declare equal memory
    assert s["status"]["tokens"] == baseline and got.stdout == s["status"]["text"] + "\n"


def test_a_pin_the_bytes_do_not_match_fails_the_session_saying_both_digests(bed, served):
    url, sha = served
    wrong = "2" * 64
    bed.cluster.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(session_of(url, wrong, "wrong-pin")))
    s = bed.wait_phase("wrong-pin", NS, ("Failed",), 300)
    ready = kube.condition(s["status"]["conditions"], "Ready")
    assert ready["reason"] == "ModelFetchFailed" and f"sha256 is {sha}, not the {wrong}" in ready["message"]
    assert not fetch.local_path(url, wrong).exists()
    shutil.rmtree(fetch.local_path(url, wrong).parent, ignore_errors=True)


def test_a_header_other_than_the_pinned_files_fails_the_session(bed, served):
    """The operator cannot check the header it read against the pin alone: the nodes that verified
    the file say the digest of its first bytes, and a server that gave the operator others is caught."""
    url, sha = served
    tampered = url.replace(".gguf", f"{TAMPERED}.gguf")
    try:
        bed.cluster.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(session_of(tampered, sha, "tampered")))
        s = bed.wait_phase("tampered", NS, ("Failed",), 300)
        ready = kube.condition(s["status"]["conditions"], "Ready")
        assert ready["reason"] == "ModelFetchFailed", ready
        assert "the server gave different bytes to different readers" in ready["message"], ready
        assert fetch.local_path(tampered, sha).is_file()   # the nodes' file itself is the pinned one
    finally:
        shutil.rmtree(fetch.local_path(tampered, sha).parent, ignore_errors=True)
