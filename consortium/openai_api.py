"""An OpenAI-compatible chat endpoint in front of the operator (`consortium api`).

Tools that speak OpenAI's chat API (`POST /v1/chat/completions`, `GET /v1/models`) use a Consortium
cluster as they would any server. Each request becomes an InferenceSession made from a template (a
session manifest: the model, its stages and node selectors, audits, receipts; the default session
when none is given), with the request's messages, token budget and sampling; its text comes back as
the operator writes it, in server-sent events with `"stream": true`. The answer also says what a plain
server cannot, under the key `consortium`: the session behind it, its audits by verdict, failovers,
rollbacks and receipts, and the command that re-checks those receipts.

What an OpenAI client cannot be told: a rollback takes back text a stream already sent (a node was
caught cheating and its work was recomputed). The stream then ends with an error that says so and
names the session, whose `status.text` holds the corrected answer; a request without streaming only
ever returns the final text.

The session stays after the answer (its Receipts are the evidence), labeled
`consortium.io/created-by=openai-api`, for `consortium prune` to archive and delete. A client that goes
away before its answer is complete has its session stopped (the consortium.io/stop annotation): it
completes with the tokens it has, instead of generating the rest for no one (`keep_on_disconnect`:
left to finish).
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import select
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from consortium import client, follow, generation, kube
from consortium import resources as r

log = logging.getLogger("consortium.api")

CREATED_BY = {f"{r.GROUP}/created-by": "openai-api"}
ROLES = ("system", "user", "assistant")
# How the session stopped (status.report.stopped) as OpenAI's finish_reason.
FINISH_REASONS = {"end_of_generation": "stop", "max_tokens": "length", "context_full": "length",
                  "status_full": "length", "stop_requested": "stop", "stop_sequence": "stop"}
STOP_REASON = "its client went away (OpenAI-compatible endpoint)"


class RequestError(Exception):
    """A request this endpoint refuses: HTTP status, OpenAI error type, message."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


class TakenBack(Exception):
    """A rollback took back text the stream had already sent."""


class ClientGone(Exception):
    """The HTTP client closed its connection before its answer was complete."""


def _peer_closed(sock) -> bool:
    """Whether a client waiting for its answer has closed its side: readable, with nothing to read."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):   # reset, or already closed
        return True


@dataclasses.dataclass
class Endpoint:
    """What the server serves: session templates by model name (the first is the default), where
    sessions are made, how long an answer may take, the key clients must give (None: any)."""
    templates: dict[str, dict]
    namespace: str = "default"
    timeout_s: float = 600.0
    api_key: str | None = None
    max_tokens_cap: int | None = None   # the most tokens one request may ask for (None: the schema's limit)
    keep_on_disconnect: bool = False     # a session whose client went away generates on to its end
    max_concurrent: int | None = None    # requests answered at once; more are refused 429 (None: no limit)
    api: object = None
    _in_flight: int = dataclasses.field(default=0, init=False, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, init=False, repr=False)

    def admit(self) -> bool:
        """Take one of the request slots (False: all taken); give it back with release()."""
        with self._lock:
            if self.max_concurrent is not None and self._in_flight >= self.max_concurrent:
                return False
            self._in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    @classmethod
    def from_files(cls, paths: list[str], **kw) -> "Endpoint":
        templates: dict[str, dict] = {}
        for p in paths:
            t = client.read_template(p)
            if not isinstance(t, dict) or t.get("kind") != "InferenceSession":
                raise ValueError(f"{p}: not an InferenceSession manifest")
            name = ((t.get("spec") or {}).get("model") or {}).get("name")
            if not name:
                raise ValueError(f"{p}: spec.model.name is missing (clients ask for the model by it)")
            templates.setdefault(name, t)
        return cls(templates or {client.DEFAULT_MODEL["name"]: client.default_template()}, **kw)

    def template(self, model: str | None) -> tuple[str, dict]:
        if not model:
            return next(iter(self.templates.items()))
        if model not in self.templates:
            raise RequestError(404, f"model {model!r} is not served here (served: {', '.join(self.templates)})",
                               "model_not_found")
        return model, self.templates[model]

    # -- a request --------------------------------------------------------------------------------

    def session_for(self, req: dict) -> tuple[str, dict]:
        """The model's name and the InferenceSession for a chat completion request."""
        if not isinstance(req, dict):
            raise RequestError(400, "the request body must be a JSON object")
        model, template = self.template(req.get("model"))
        messages = _messages(req.get("messages"))
        if req.get("n", 1) != 1:
            raise RequestError(400, "n: one choice per request")
        stop = _stop_sequences(req.get("stop"))
        max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)):
            raise RequestError(400, "max_tokens must be an integer")
        if self.max_tokens_cap is not None:
            asked = max_tokens if max_tokens is not None else (template.get("spec") or {}).get("maxTokens", 64)
            if asked > self.max_tokens_cap:
                raise RequestError(400, f"max_tokens {asked} is above this endpoint's limit of {self.max_tokens_cap}")
        sampling = {}
        for key, ours in (("temperature", "temperature"), ("top_p", "topP"), ("seed", "seed")):
            value = req.get(key)
            if value is not None:
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise RequestError(400, f"{key} must be a number")
                sampling[ours] = value
        body = client.session_body(template, messages=messages, generate_name="chat-", max_tokens=max_tokens,
                                   sampling=sampling or None, labels=CREATED_BY, stop_sequences=stop)
        body["metadata"].pop("name", None)   # one session per request, whatever the template is called
        body["metadata"]["generateName"] = "chat-"
        return model, body

    def client_gone(self, name: str) -> None:
        """The client of session `name` went away: stop the session (unless told to keep it)."""
        if self.keep_on_disconnect:
            log.info("%s: the client went away; the session goes on", name)
            return
        try:
            client.request_stop(self.api, self.namespace, name, STOP_REASON)
            log.info("%s: the client went away; the session is stopped", name)
        except Exception as e:  # noqa: BLE001 - e.g. a Role without patch: it then runs to its end
            log.warning("%s: the client went away, and the session could not be stopped (%s); it goes on",
                        name, kube.reason(e))

    def create(self, body: dict) -> dict:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.create_namespaced_custom_object(r.GROUP, r.VERSION, self.namespace, "inferencesessions",
                                                            body)
        except ApiException as e:
            if e.status in (400, 422):   # the schema's refusal names the field and the rule
                raise RequestError(400, f"the session was refused: {client.refusal(e)}") from e
            raise RequestError(503, f"the Kubernetes API answered {e.status} {e.reason}", "api_error") from e
        except Exception as e:   # noqa: BLE001 - no answer at all: the API server is away
            if not kube.transient(e):
                raise
            raise RequestError(503, f"the Kubernetes API cannot be reached: {kube.reason(e)}", "api_error") from e


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages: a non-empty list of {role, content} is required")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(400, f"messages[{i}] must be an object")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise RequestError(400, f"messages[{i}].role must be one of {', '.join(ROLES)} (or developer)")
        content = m.get("content")
        if isinstance(content, list):   # content parts: text only
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise RequestError(400, f"messages[{i}].content: only text parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise RequestError(400, f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": role, "content": content})
    return out


def _model(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "consortium"}


def _stop_sequences(stop) -> list[str] | None:
    """A request's `stop` (a string or up to four) as the session's spec.stopSequences."""
    if stop is None:
        return None
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "stop must be a string or a list of strings")
    stop = [s for s in stop if s]
    if len(stop) > 4:
        raise RequestError(400, f"stop: at most 4 sequences, not {len(stop)}")
    if any(len(s) > r.MAX_STOP_SEQUENCE for s in stop):
        raise RequestError(400, f"stop: a sequence may have at most {r.MAX_STOP_SEQUENCE} characters")
    return stop or None


def summary(namespace: str, name: str, status: dict) -> dict:
    """What the answer says about the session behind it."""
    m = status.get("metrics") or {}
    return {"session": f"{namespace}/{name}", "phase": status.get("phase"),
            "tokensPerSecond": m.get("tokensPerSecond"),
            "audits": {"total": m.get("audits", 0), "passed": m.get("auditsPassed", 0),
                       "passedWithinTolerance": m.get("auditsPassedWithinTolerance", 0),
                       "mismatch": m.get("auditsMismatch", 0), "fraud": m.get("auditsFraud", 0)},
            "failovers": m.get("failovers", 0), "rollbacks": m.get("rollbacks", 0), "receipts": m.get("receipts", 0),
            "verify": f"consortium verify-receipts {name} -n {namespace}"}


def usage(status: dict) -> dict:
    completion = len(status.get("tokens") or [])
    prompt = len((((status.get("report") or {}).get("driverState") or {}).get("prompt_tokens")) or [])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _failed(namespace: str, name: str, status: dict) -> RequestError:
    """A session that ended without completing, as the answer's error (its Ready reason and message)."""
    ready = kube.condition(status.get("conditions"), "Ready") or {}
    return RequestError(502, f"session {namespace}/{name} failed: {ready.get('reason')}: {ready.get('message')}",
                        "session_failed")


def finish_reason(status: dict) -> str:
    return FINISH_REASONS.get((status.get("report") or {}).get("stopped"), "stop")


class _LogLines(io.TextIOBase):
    """A SessionView's event lines, into the server's log under the session's name."""

    def __init__(self, name: str):
        self.name = name

    def write(self, s: str) -> int:
        for line in s.splitlines():
            if line.strip():
                log.info("%s %s", self.name, line.strip())
        return len(s)


class _Waiting(follow.SessionView):
    """The session behind a request answered whole: at each change, whether its client still waits
    (ClientGone when it has closed its connection)."""

    def __init__(self, name: str, connection):
        super().__init__(io.StringIO(), _LogLines(name), timestamps=False)
        self.connection = connection

    def update(self, obj: dict) -> None:
        super().update(obj)
        if not self.finished() and _peer_closed(self.connection):
            raise ClientGone()


class _Relay(follow.SessionView):
    """A SessionView that hands each new piece of text to `emit` and stops at a rollback, or when
    the client is no longer there to take it."""

    def __init__(self, name: str, emit, stops: generation.StopSequences = generation.StopSequences()):
        super().__init__(io.StringIO(), _LogLines(name), timestamps=False)
        self.emit, self.stops = emit, stops

    def _write_text(self, text: str) -> None:
        # Text a stop sequence ends is not the answer's, nor a tail that may still become one.
        text = self.stops.shown(text, self.status.get("phase") in follow.FINAL_PHASES)
        if not text.startswith(self.printed):
            raise TakenBack()
        if text[len(self.printed):]:
            try:
                self.emit(text[len(self.printed):])
            except OSError as e:   # a broken pipe or reset: not the API server's, so not retried
                raise ClientGone() from e
        self.printed = text


def handler_for(endpoint: Endpoint):
    class Handler(BaseHTTPRequestHandler):
        server_version = "consortium-api"

        def log_message(self, fmt, *args):   # the access log, through logging
            log.info("%s %s", self.address_string(), fmt % args)

        # -- plumbing ---------------------------------------------------------------------------

        def _json(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, e: RequestError, extra: dict | None = None) -> None:
            self._json(e.status, {"error": {"message": str(e), "type": e.kind, "code": e.status, **(extra or {})}})

        def _authorized(self) -> bool:
            if endpoint.api_key is None or self.headers.get("Authorization") == f"Bearer {endpoint.api_key}":
                return True
            self._error(RequestError(401, "a bearer token (the endpoint's API key) is required", "authentication_error"))
            return False

        def _sse(self, obj) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        # -- routes -----------------------------------------------------------------------------

        def do_GET(self):
            if self.path == "/healthz":
                return self._json(200, {"ok": True})
            if not self._authorized():
                return
            if self.path == "/v1/models":
                return self._json(200, {"object": "list", "data": [_model(m) for m in endpoint.templates]})
            if self.path.startswith("/v1/models/"):
                name = urllib.parse.unquote(self.path[len("/v1/models/"):])
                if name in endpoint.templates:
                    return self._json(200, _model(name))
                return self._error(RequestError(404, f"model {name!r} is not served here", "model_not_found"))
            self._error(RequestError(404, f"no route {self.path}", "not_found"))

        def do_POST(self):
            if not self._authorized():
                return
            if self.path != "/v1/chat/completions":
                return self._error(RequestError(404, f"no route {self.path}", "not_found"))
            if not endpoint.admit():
                # Each answer is a session on the cluster's nodes: past the limit, the client retries.
                self.close_connection = True
                return self._error(RequestError(429, f"{endpoint.max_concurrent} requests are being answered, this "
                                                     f"endpoint's limit; try again shortly", "rate_limit_exceeded"))
            try:
                self._chat()
            finally:
                endpoint.release()

        def _chat(self):
            try:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    req = json.loads(self.rfile.read(length) or b"null")
                except ValueError as e:
                    raise RequestError(400, f"the body is not JSON: {e}") from e
                model, body = endpoint.session_for(req)
                stops = generation.StopSequences.of(body["spec"].get("stopSequences"))
                made = endpoint.create(body)
            except RequestError as e:
                return self._error(e)
            name = made["metadata"]["name"]
            log.info("%s created for %s (%s)", name, self.address_string(), model)
            ident = {"id": f"chatcmpl-{name}", "created": int(time.time()), "model": model}
            if req.get("stream"):
                self._stream(name, ident, stops)
            else:
                self._complete(name, ident, stops)

        def _follow(self, name: str, view: follow.SessionView) -> dict:
            try:
                follow.follow(endpoint.namespace, name, view, timeout_s=endpoint.timeout_s, api=endpoint.api)
            except TimeoutError as e:
                raise RequestError(504, f"{e}; the session goes on", "timeout") from e
            except follow.SessionGone as e:
                raise RequestError(410, str(e), "session_deleted") from e
            except (TakenBack, ClientGone):
                raise
            except Exception as e:  # noqa: BLE001 - the API refused the watch or the read
                raise RequestError(502, f"following session {endpoint.namespace}/{name} failed: {kube.reason(e)}; "
                                   f"the session goes on", "api_error") from e
            return view.status

        def _complete(self, name: str, ident: dict, stops: generation.StopSequences) -> None:
            view = _Waiting(name, self.connection)
            try:
                st = self._follow(name, view)
                if st.get("phase") != "Completed":
                    raise _failed(endpoint.namespace, name, st)
            except ClientGone:
                return endpoint.client_gone(name)
            except RequestError as e:
                return self._error(e, {"consortium": summary(endpoint.namespace, name, view.status)})
            self._json(200, {**ident, "object": "chat.completion",
                             "choices": [{"index": 0, "message": {"role": "assistant",
                                                                  "content": stops.shown(st.get("text") or "", True)},
                                          "finish_reason": finish_reason(st)}],
                             "usage": usage(st), "consortium": summary(endpoint.namespace, name, st)})

        def _stream(self, name: str, ident: dict, stops: generation.StopSequences) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()

            def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
                return {**ident, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

            view = _Relay(name, lambda text: self._sse(chunk({"content": text})), stops)
            try:
                self._sse(chunk({"role": "assistant", "content": ""}))
                try:
                    st = self._follow(name, view)
                except TakenBack:
                    st = view.status
                    raise RequestError(409, f"session {endpoint.namespace}/{name} rolled back text this stream "
                                       f"had sent (a node was caught and its work recomputed); its status.text "
                                       f"holds the corrected answer", "rolled_back") from None
                if st.get("phase") != "Completed":
                    raise _failed(endpoint.namespace, name, st)
                self._sse(chunk({}, finish_reason(st), usage=usage(st),
                                consortium=summary(endpoint.namespace, name, st)))
            except RequestError as e:
                self._sse({"error": {"message": str(e), "type": e.kind, "code": e.status,
                                     "consortium": summary(endpoint.namespace, name, view.status)}})
            except (ClientGone, BrokenPipeError, ConnectionResetError):
                return endpoint.client_gone(name)
            self._sse("[DONE]")

    return Handler


def serve(endpoint: Endpoint, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """The server, bound (port 0: any free one, see server_address); call serve_forever()."""
    endpoint.api = endpoint.api or kube.api()
    srv = ThreadingHTTPServer((host, port), handler_for(endpoint))
    srv.daemon_threads = True
    return srv


def api_key_from_env() -> str | None:
    return os.environ.get("CONSORTIUM_API_KEY") or None


__all__ = ["Endpoint", "RequestError", "serve", "summary", "usage", "finish_reason", "api_key_from_env"]
