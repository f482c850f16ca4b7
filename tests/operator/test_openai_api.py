"""The OpenAI-compatible endpoint (`consortium api`) against the operator on a real API server: a chat
completion becomes a session whose tokens equal the single node's, answered whole or streamed as
server-sent events, with the session's audits and receipts beside the text; requests it cannot
serve are refused with OpenAI's error shape, and what the API server's schema refuses says why."""
from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from consortium import openai_api, testbed
from consortium import resources as r

pytestmark = pytest.mark.k8s

NS = "tc-api"
PROMPT = testbed.sky_is_blue(8)["spec"]["prompt"]
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def endpoint(bed):
    bed.cluster.kubectl("create", "namespace", NS)
    ep = openai_api.Endpoint({MODEL: testbed.sky_is_blue(8)}, namespace=NS, timeout_s=240, api=bed.api())
    srv = openai_api.serve(ep, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield ep, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def call(url: str, body: dict | None = None, key: str | None = None):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def ask(max_tokens: int = 8, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def session(bed, name: str) -> dict:
    return bed.api().get_namespaced_custom_object(r.GROUP, r.VERSION, NS, "inferencesessions", name)


def test_a_chat_completion_is_a_session_with_the_single_nodes_tokens(endpoint, bed, baseline):
    _, url = endpoint
    status, _, text = call(f"{url}/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(text)["data"]] == [MODEL]
    status, _, text = call(f"{url}/v1/models/{MODEL}")
    assert status == 200 and json.loads(text)["id"] == MODEL
    assert call(f"{url}/v1/models/gpt-4o")[0] == 404

    status, ctype, text = call(f"{url}/v1/chat/completions", ask())
    assert status == 200 and ctype == "application/json", text
    got = json.loads(text)
    name = got["consortium"]["session"].split("/")[1]
    s = session(bed, name)
    assert s["status"]["tokens"] == baseline[:8]
    assert s["metadata"]["labels"][f"{r.GROUP}/created-by"] == "openai-api"
    assert got["object"] == "chat.completion" and got["id"] == f"chatcmpl-{name}" and got["model"] == MODEL
    choice = got["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": s["status"]["text"]}
    assert choice["finish_reason"] == "length"   # max_tokens reached
    assert got["usage"]["completion_tokens"] == 8 and got["usage"]["prompt_tokens"] > 8
    audits = got["consortium"]["audits"]
    assert audits["total"] > 0 and audits["passed"] == audits["total"]
    assert got["consortium"]["receipts"] == s["status"]["metrics"]["receipts"] > 0


def test_a_streamed_completion_arrives_in_pieces_that_make_the_sessions_text(endpoint, bed):
    _, url = endpoint
    status, ctype, text = call(f"{url}/v1/chat/completions", ask(12, stream=True))
    assert status == 200 and ctype == "text/event-stream"
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1]]
    assert len(pieces) >= 2   # streamed as the operator wrote it, not in one piece at the end
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 12
    s = session(bed, last["consortium"]["session"].split("/")[1])
    assert "".join(pieces) == s["status"]["text"] and s["status"]["phase"] == "Completed"


@pytest.mark.parametrize("stream", [False, True], ids=["answered-whole", "streamed"])
def test_a_stop_sequence_ends_the_session_and_the_answer_before_it(endpoint, bed, baseline, stream):
    # The answer to PROMPT names Rayleigh scattering within its first 20 tokens.
    _, url = endpoint
    status, _, text = call(f"{url}/v1/chat/completions", ask(40, stream=stream, stop=["Rayleigh", "never seen"]))
    assert status == 200, text
    if stream:
        chunks = [json.loads(e[len("data: "):]) for e in text.split("\n\n") if e.startswith("data: {")]
        content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        last = chunks[-1]
    else:
        last = json.loads(text)
        content = last["choices"][0]["message"]["content"]
    assert last["choices"][0]["finish_reason"] == "stop"
    st = session(bed, last["consortium"]["session"].split("/")[1])["status"]
    assert st["report"]["stopped"] == "stop_sequence" and st["report"]["stopSequence"] == "Rayleigh"
    assert st["text"].startswith(content + "Rayleigh") and "Rayleigh" not in content and content
    tokens = st["tokens"]
    assert len(tokens) < 40 and tokens == baseline[:len(tokens)]


def test_the_official_openai_client_reads_answers_streams_and_refusals(endpoint, bed, baseline):
    import openai

    _, url = endpoint
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    assert [m.id for m in c.models.list()] == [MODEL] and c.models.retrieve(MODEL).id == MODEL
    got = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=6,
                                    temperature=0)
    name = got.model_extra["consortium"]["session"].split("/")[1]
    assert session(bed, name)["status"]["tokens"] == baseline[:6]
    assert got.choices[0].message.content == session(bed, name)["status"]["text"]
    assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == 6

    pieces, finish = [], None
    for ch in c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=6,
                                        temperature=0, stream=True):
        if ch.choices:
            pieces.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
    assert "".join(pieces) == got.choices[0].message.content and finish == "length"

    with pytest.raises(openai.NotFoundError, match="not served here"):
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="maxTokens"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=100000)


@pytest.mark.parametrize("body,status,words", [
    ({"model": MODEL}, 400, "messages: a non-empty list"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "not served here"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "role must be one of"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "only text parts"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}, 400, "at most 4 sequences"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [7]}, 400, "a string or a list of strings"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "maxTokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature must be a number"),
])
def test_requests_it_cannot_serve_are_refused_with_the_reason(endpoint, bed, body, status, words):
    _, url = endpoint
    before = len(bed.api().list_namespaced_custom_object(r.GROUP, r.VERSION, NS, "inferencesessions")["items"])
    got, ctype, text = call(f"{url}/v1/chat/completions", body)
    assert got == status and ctype == "application/json", text
    err = json.loads(text)["error"]
    assert words in err["message"], err
    after = len(bed.api().list_namespaced_custom_object(r.GROUP, r.VERSION, NS, "inferencesessions")["items"])
    assert after == before   # nothing made


def test_a_token_cap_refuses_longer_requests_before_any_session_is_made(endpoint, bed):
    ep, url = endpoint
    ep.max_tokens_cap = 6
    try:
        before = len(bed.api().list_namespaced_custom_object(r.GROUP, r.VERSION, NS, "inferencesessions")["items"])
        status, _, text = call(f"{url}/v1/chat/completions", ask(7))
        assert status == 400 and "max_tokens 7 is above this endpoint's limit of 6" in text
        status, _, text = call(f"{url}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 400 and "max_tokens 8 is above" in text   # the template's maxTokens when none is asked
        after = len(bed.api().list_namespaced_custom_object(r.GROUP, r.VERSION, NS, "inferencesessions")["items"])
        assert after == before
    finally:
        ep.max_tokens_cap = None


def test_past_its_concurrency_limit_a_request_is_refused_429_and_makes_nothing(endpoint, bed):
    ep, url = endpoint
    ep.max_concurrent = 1
    assert ep.admit()   # the one slot, as a request being answered holds it
    try:
        before = len(bed.get("inferencesessions", namespace=NS)["items"])
        status, _, text = call(f"{url}/v1/chat/completions", ask(4))
        assert status == 429 and json.loads(text)["error"]["type"] == "rate_limit_exceeded", text
        assert len(bed.get("inferencesessions", namespace=NS)["items"]) == before
    finally:
        ep.release()
    try:
        status, _, text = call(f"{url}/v1/chat/completions", ask(4))   # the slot is free again
        assert status == 200, text
    finally:
        ep.max_concurrent = None


def test_with_an_api_key_only_clients_that_send_it_are_served(endpoint):
    ep, url = endpoint
    ep.api_key = "s3cret"
    try:
        status, _, text = call(f"{url}/v1/models")
        assert status == 401 and json.loads(text)["error"]["type"] == "authentication_error"
        assert call(f"{url}/v1/models", key="wrong")[0] == 401
        assert call(f"{url}/v1/models", key="s3cret")[0] == 200
        assert call(f"{url}/healthz")[0] == 200   # for probes
    finally:
        ep.api_key = None


def _new_session(bed, before: set[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        made = {s["metadata"]["name"] for s in bed.get("inferencesessions", namespace=NS)["items"]} - before
        if made:
            return made.pop()
        assert time.monotonic() < deadline, "no session was made for the request"
        time.sleep(0.2)


def _ended(bed, name: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (st := session(bed, name).get("status") or {}).get("phase") not in ("Completed", "Failed"):
        assert time.monotonic() < deadline, f"{name} still {st.get('phase')}"
        time.sleep(0.3)
    return st


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "answered-whole"])
def test_a_session_whose_client_goes_away_is_stopped(endpoint, bed, stream):
    # A prompt the model answers at length: without the stop it would generate all 500 tokens.
    _, url = endpoint
    host, port = url.removeprefix("http://").split(":")
    before = {s["metadata"]["name"] for s in bed.get("inferencesessions", namespace=NS)["items"]}
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "Write the numbers from 1 to 300 in words, "
                                                                  "separated by commas."}],
         "max_tokens": 500, "temperature": 0, "stream": stream}), {"Content-Type": "application/json"})
    name = _new_session(bed, before)
    if stream:
        resp = conn.getresponse()
        while b'"content": "' not in (line := resp.fp.readline()) or b'"content": ""' in line:
            assert line, "the stream ended before any text"
        resp.close()   # the response holds the socket open too
    else:
        deadline = time.monotonic() + 120
        while ((session(bed, name).get("status") or {}).get("position") or 0) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    conn.close()   # the client goes away mid-answer

    st = _ended(bed, name)
    assert st["phase"] == "Completed" and st["report"]["stopped"] == "stop_requested", st.get("report", {}).get("stopped")
    assert st["report"]["stopReason"] == openai_api.STOP_REASON
    assert 1 <= len(st["tokens"]) < 500
