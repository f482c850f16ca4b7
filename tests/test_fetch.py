"""Models fetched by URL (consortium.fetch) from a real HTTP server on loopback: the pinned file and
nothing else, a download cut short continued with a Range request, one download for several
fetchers, and the background fetches an agent answers FetchModel from."""
from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time

import pytest

from consortium import fetch

BODY = os.urandom(3 * fetch.CHUNK + 12345)
SHA = hashlib.sha256(BODY).hexdigest()


class Server(http.server.ThreadingHTTPServer):
    """Serves `body` (BODY) at /model.gguf, honoring `Range: bytes=N-` and `bytes=N-M` unless
    `ranges` is off; `cut_after` bytes into the next answer it closes the connection (once)."""
    daemon_threads = True

    def __init__(self, body: bytes = BODY, ranges: bool = True):
        self.body, self.ranges = body, ranges
        self.requests: list[str | None] = []   # the Range header of each GET
        self.cut_after: int | None = None
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/model.gguf"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv: Server = self.server
        srv.requests.append(self.headers.get("Range"))
        if self.path != "/model.gguf":
            self.send_error(404)
            return
        body, start, end = srv.body, 0, len(srv.body) - 1
        if self.headers.get("Range") and srv.ranges:
            first, _, last = self.headers["Range"].split("=")[1].partition("-")
            start, end = int(first), min(end, int(last)) if last else end
        if start >= len(body):
            self.send_error(416)
            return
        partial = (start, end) != (0, len(body) - 1)
        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
        self.send_header("Content-Length", str(end + 1 - start))
        self.end_headers()
        data = body[start:end + 1]
        if srv.cut_after is not None:
            data, srv.cut_after = data[:srv.cut_after], None
            self.wfile.write(data)
            self.wfile.flush()
            self.close_connection = True
            return
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass   # a reader that wanted the first bytes alone hung up


@pytest.fixture
def server():
    srv = Server()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_the_pinned_file_is_fetched_once_and_then_found(server, tmp_path):
    p = fetch.Progress()
    path = fetch.fetch(server.url, SHA, tmp_path, p)
    assert path.read_bytes() == BODY and path == fetch.local_path(server.url, SHA, tmp_path)
    assert p.done and p.bytes == p.total == len(BODY) and str(p) == "fetched"
    assert fetch.fetch(server.url, SHA, tmp_path) == path and server.requests == [None]   # no second download


def test_bytes_that_hash_otherwise_are_refused_and_not_kept(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(fetch.FetchError, match=f"sha256 is {SHA}, not the {wrong}"):
        fetch.fetch(server.url, wrong, tmp_path)
    assert not any(f.is_file() and not f.name.startswith(".") for f in (tmp_path / "models" / "fetched" / wrong).iterdir())
    with pytest.raises(fetch.FetchError, match="needs its sha256"):
        fetch.fetch(server.url, "abc", tmp_path)
    with pytest.raises(fetch.FetchError, match="404"):
        fetch.fetch(server.url.replace("model.gguf", "other.gguf"), SHA, tmp_path)
    with pytest.raises(fetch.FetchError, match="not an http"):
        fetch.fetch("file:///etc/passwd", SHA, tmp_path)


def test_a_file_larger_than_the_free_disk_is_refused_before_its_first_byte(server, tmp_path, monkeypatch):
    real = fetch.shutil.disk_usage
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda p: real(p)._replace(free=len(BODY) - 1))
    with pytest.raises(fetch.FetchError, match=r"3 MB to fetch, 3 MB free where the cache is"):
        fetch.fetch(server.url, SHA, tmp_path)
    assert list(fetch.local_path(server.url, SHA, tmp_path).parent.iterdir()) == [
        fetch.local_path(server.url, SHA, tmp_path).parent / ".lock"]   # not a byte written
    monkeypatch.setattr(fetch.shutil, "disk_usage", real)
    assert fetch.fetch(server.url, SHA, tmp_path).read_bytes() == BODY


def test_a_download_cut_short_goes_on_from_where_it_stopped(server, tmp_path):
    server.cut_after = fetch.CHUNK + 7
    with pytest.raises(fetch.FetchError, match="cut off after"):
        fetch.fetch(server.url, SHA, tmp_path)
    path = fetch.fetch(server.url, SHA, tmp_path)
    assert path.read_bytes() == BODY
    assert server.requests == [None, f"bytes={fetch.CHUNK + 7}-"]


def test_several_fetchers_share_one_download(server, tmp_path):
    got = []
    threads = [threading.Thread(target=lambda: got.append(fetch.fetch(server.url, SHA, tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 3 and len(set(got)) == 1 and server.requests == [None]


def test_background_fetches_say_how_far_then_done_and_a_failure_once(server, tmp_path):
    fetches = fetch.Fetches(tmp_path)
    first = fetches.progress(server.url, SHA)
    assert not first.error
    deadline = time.monotonic() + 30
    while not fetches.progress(server.url, SHA).done:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert fetches.ready(server.url, SHA).read_bytes() == BODY and server.requests == [None]

    bad = "f" * 64
    fetches.progress(server.url, bad)
    while not (p := fetches.progress(server.url, bad)).error:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "not the" in p.error
    assert not fetches.progress(server.url, bad).error   # asked again: tried again


@pytest.fixture(scope="module")
def gguf():
    from consortium.models import resolve_model

    path = resolve_model(None)
    return path, path.read_bytes()


def test_the_gguf_header_length_is_where_the_tensor_data_begins(gguf):
    from gguf import GGUFReader

    path, body = gguf
    length = fetch.gguf_header_length(body[:16 << 20])
    assert length == GGUFReader(str(path)).data_offset and length < 16 << 20
    assert fetch.gguf_header_length(body[:length - 100]) is None   # ends inside the header: read more
    with pytest.raises(fetch.FetchError, match="not a GGUF"):
        fetch.gguf_header_length(BODY[:1 << 20])
    assert fetch.header_digest(path) == (length, hashlib.sha256(body[:length]).hexdigest())


@pytest.mark.parametrize("ranges", [True, False], ids=["ranges", "no-ranges"])
def test_the_operator_reads_a_models_header_alone(gguf, tmp_path, ranges):
    """A few MB in a sparse file of the model's size, from which llama.cpp reads the tokenizer and the
    layer count as from the model; a server without Range requests has the file fetched whole."""
    from consortium.tokenizer import Tokenizer
    from node_agent.engine.slicing import read_model_info

    path, body = gguf
    srv = Server(body, ranges=ranges)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        sha = hashlib.sha256(body).hexdigest()
        got = fetch.fetch_header(srv.url, sha, tmp_path)
        length = fetch.gguf_header_length(body[:16 << 20])
        if ranges:
            assert got == fetch.header_path(srv.url, sha, tmp_path) and got.stat().st_size == len(body)
            assert got.stat().st_blocks * 512 < 2 * length + (1 << 20)   # sparse: the header's blocks alone
            assert srv.requests[0] == f"bytes=0-{fetch.HEADER_FIRST_READ - 1}"
            assert all(r.startswith("bytes=0-") for r in srv.requests)   # never the whole file
            assert fetch.header_digest(got) == fetch.header_digest(path)
        else:
            assert got == fetch.local_path(srv.url, sha, tmp_path) and got.read_bytes() == body
            assert srv.requests == [f"bytes=0-{fetch.HEADER_FIRST_READ - 1}", None]
        assert read_model_info(got).n_layers == read_model_info(path).n_layers == 30
        a, b = Tokenizer(got), Tokenizer(path)
        try:
            text = "Why is the sky blue? Rayleigh scattering."
            assert a.encode(text) == b.encode(text) and a.chat_template == b.chat_template
        finally:
            a.close()
            b.close()
        asked = len(srv.requests)
        assert fetch.fetch_header(srv.url, sha, tmp_path) == got and len(srv.requests) == asked   # kept
        assert fetch.prefix_digest(path, length) == fetch.header_digest(got)[1]
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_header_that_never_ends_is_not_read_past_the_cap(tmp_path, monkeypatch):
    """A file whose "header" claims a billion-entry array: the operator gives up at the cap instead of
    reading a model of gigabytes into memory."""
    import struct

    monkeypatch.setattr(fetch, "MAX_HEADER_BYTES", 8 << 20)
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"x" + struct.pack("<IIQ", 9, 4, 10 ** 9)
    srv = Server(head + bytes(20 << 20))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(fetch.FetchError, match="no GGUF header ends within its first 8 MiB"):
            fetch.fetch_header(srv.url, "a" * 64, tmp_path)
        assert srv.requests == [f"bytes=0-{(4 << 20) - 1}", f"bytes=0-{(8 << 20) - 1}"]
    finally:
        srv.shutdown()
        srv.server_close()
