"""A session whose model is named by URL, through the operator on a real API server: the operator and
the agents fetch the file (one download here, where they share a cache), pinned by its sha256, and
the session's tokens are the single node's; a pin the bytes do not match fails the session saying
both digests."""
from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

from consortium import fetch, kube, testbed
from consortium.models import resolve_model
from consortium.testbed import TEST_MAX_TOKENS as MAX_TOKENS
from node_agent.engine.slicing import sha256_file

pytestmark = pytest.mark.k8s

NS = "tc-fetch"


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    gets: list[str] = []

    def do_GET(self):
        CountingHandler.gets.append(self.path)
        super().do_GET()

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
    assert CountingHandler.gets == [f"/{Path(url).name}"]   # one download, for the operator and three agents
    assert fetch.local_path(url, sha).is_file()
    placed = kube.condition(s["status"]["conditions"], "Scheduled")
    assert placed["status"] == "True" and placed["reason"] == "Placed"


def test_a_pin_the_bytes_do_not_match_fails_the_session_saying_both_digests(bed, served):
    url, sha = served
    wrong = "2" * 64
    bed.cluster.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(session_of(url, wrong, "wrong-pin")))
    s = bed.wait_phase("wrong-pin", NS, ("Failed",), 300)
    ready = kube.condition(s["status"]["conditions"], "Ready")
    assert ready["reason"] == "ModelFetchFailed" and f"sha256 is {sha}, not the {wrong}" in ready["message"]
    assert not fetch.local_path(url, wrong).exists()
