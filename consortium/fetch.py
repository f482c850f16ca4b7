"""Model files fetched by URL (an InferenceSession's `model.source: https://...`), pinned by SHA-256.

Every machine that runs, audits or may take over a stage needs the same GGUF. A session whose model
names a URL has the operator and each of those agents fetch it into their own cache
(`<cache>/models/fetched/<sha256>/<file name>`), where it is used only once its bytes hash to the
session's `model.sha256`. A download goes to a `.partial` file beside it and continues from there
(an HTTP Range request) when it was cut short; one process at a time fetches a given file (a lock
file), and the others wait for it or take it once it is there. A file that hashes to anything else
is deleted and the fetch fails with both digests: nothing unpinned is ever loaded.

The operator runs no stage: it needs the model's GGUF header alone (tokenizer, layer count, tensor
index), which `fetch_header` reads with Range requests into a sparse file of the model's size
(`<sha256>/header/<file name>`), a few MB of a model of gigabytes. Those bytes cannot be checked
against the pin on their own, so the nodes, once they hold the verified file, say the digest of its
first `header_bytes` bytes (FetchModel) and the operator compares it with what it read.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import os
import shutil
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import consortium.cache

log = logging.getLogger("consortium.fetch")

CHUNK = 1 << 20
TIMEOUT_S = 30.0            # per read: a server that stops sending fails the fetch, which may be tried again
SCHEMES = ("http://", "https://")


class FetchError(RuntimeError):
    """A fetch that cannot give the pinned file: the server refused, the bytes hash otherwise, ..."""


def is_url(source: str | None) -> bool:
    return bool(source) and source.startswith(SCHEMES)


def local_path(url: str, sha256: str, cache: Path | None = None) -> Path:
    """Where the file pinned by `sha256` is kept once fetched."""
    name = os.path.basename(url.split("?", 1)[0].split("#", 1)[0])
    if name in ("", ".", ".."):
        name = "model.gguf"
    return (cache or consortium.cache.cache_dir()) / "models" / "fetched" / sha256 / name


@dataclasses.dataclass
class Progress:
    done: bool = False
    bytes: int = 0
    total: int = 0          # 0: the server did not say
    error: str = ""

    def __str__(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        if self.done:
            return "fetched"
        of = f" of {self.total / 1e6:.0f} MB ({100 * self.bytes / self.total:.0f}%)" if self.total else " MB"
        return f"{self.bytes / 1e6:.0f}{of}"


def fetch(url: str, sha256: str, cache: Path | None = None, progress: Progress | None = None) -> Path:
    """The pinned file, fetched first if it is not in the cache yet. Blocks; FetchError when the
    file cannot be had."""
    if not is_url(url):
        raise FetchError(f"{url!r} is not an http(s) URL")
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise FetchError("a model fetched by URL needs its sha256 (64 lower-case hex digits)")
    progress = progress or Progress()
    path = local_path(url, sha256, cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # another process fetching it: wait, then find it there
        if path.is_file():
            progress.done, progress.bytes = True, path.stat().st_size
            progress.total = progress.bytes
            return path
        partial = path.with_name(path.name + ".partial")
        _download(url, partial, progress)
        digest = _sha256(partial)
        if digest != sha256:
            partial.unlink()
            raise FetchError(f"{url} gave a file whose sha256 is {digest}, not the {sha256} the session pins")
        os.replace(partial, path)
        progress.done = True
        log.info("fetched %s (%d bytes, sha256 %s)", url, progress.bytes, sha256[:16])
        return path


def _open(url: str, byte_range: str | None = None):
    """The server's answer to a GET (of `byte_range`, 'A-' or 'A-B', when given); None when the range
    starts past the end of the file (416). FetchError for any other refusal or a server not reached."""
    req = urllib.request.Request(url, headers={"Range": f"bytes={byte_range}"} if byte_range else {})
    try:
        return urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and byte_range:
            return None
        raise FetchError(f"{url}: the server answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"{url}: {getattr(e, 'reason', e)}") from None


def _download(url: str, partial: Path, progress: Progress) -> None:
    have = partial.stat().st_size if partial.exists() else 0
    resp = _open(url, f"{have}-" if have else None)
    if resp is None:   # asked past the end: what is there is the whole file
        progress.bytes = progress.total = have
        return
    with resp:
        resumed = have and resp.status == 206
        if not resumed:
            have = 0   # the server sends it whole: start over
        length = int(resp.headers.get("Content-Length") or 0)
        progress.total, progress.bytes = (have + length if length else 0), have
        free = shutil.disk_usage(partial.parent).free + (0 if resumed else (partial.stat().st_size if partial.exists() else 0))
        if length > free:   # refused before the first byte rather than failing with a full disk
            raise FetchError(f"{url}: {length / 1e6:.0f} MB to fetch, {free / 1e6:.0f} MB free where the cache is")
        said = time.monotonic()
        with open(partial, "ab" if resumed else "wb") as f:
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except OSError as e:
                    raise FetchError(f"{url}: cut off after {progress.bytes} bytes ({e}); fetching again goes "
                                     f"on from there") from None
                if not chunk:
                    break
                f.write(chunk)
                progress.bytes += len(chunk)
                if time.monotonic() - said > 10:
                    log.info("fetching %s: %s", url, progress)
                    said = time.monotonic()
    if progress.total and progress.bytes < progress.total:
        raise FetchError(f"{url}: cut off after {progress.bytes} of {progress.total} bytes; fetching again goes on "
                         f"from there")
    progress.total = progress.total or progress.bytes


HEADER_FIRST_READ = 4 << 20   # most GGUF headers fit (a 128k vocabulary takes about 8 MB): read 4x more until one does
# A 256k vocabulary's header is some 20 MB; a "header" past this is no model's, and is not read into memory.
MAX_HEADER_BYTES = 256 << 20


def header_path(url: str, sha256: str, cache: Path | None = None) -> Path:
    """Where the header of the file pinned by `sha256` is kept (a sparse file of the model's size)."""
    full = local_path(url, sha256, cache)
    return full.parent / "header" / full.name


def fetch_header(url: str, sha256: str, cache: Path | None = None, progress: Progress | None = None) -> Path:
    """A file that holds the model's GGUF header and is the model's size (zeros after the header), for
    reading its metadata and tokenizer, never its weights; the verified file itself where the cache
    holds it already, and a server that ignores Range requests has it fetched whole. Blocks;
    FetchError when it cannot be had or is no GGUF."""
    full = local_path(url, sha256, cache)
    if full.is_file():
        return full
    path = header_path(url, sha256, cache)
    progress = progress or Progress()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(full.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if full.is_file():
            return full
        if path.is_file():
            progress.done = True
            return path
        size = HEADER_FIRST_READ
        while True:
            got = _read_range(url, size)
            if got is None:
                break
            data, total = got
            progress.bytes, progress.total = len(data), total
            length = gguf_header_length(data)
            if length is not None:
                tmp = path.with_name(path.name + ".partial")
                with open(tmp, "wb") as f:
                    f.write(data[:length])
                    f.truncate(total)
                os.replace(tmp, path)
                progress.done = True
                log.info("read the GGUF header of %s: %d of %d bytes", url, length, total)
                return path
            if len(data) >= total:
                raise FetchError(f"{url}: the GGUF header runs past the end of the file ({total} bytes)")
            if size >= MAX_HEADER_BYTES:
                raise FetchError(f"{url}: no GGUF header ends within its first {MAX_HEADER_BYTES >> 20} MiB")
            size = min(4 * size, MAX_HEADER_BYTES)
    log.info("%s answers no Range requests: fetching it whole for its header", url)
    return fetch(url, sha256, cache, progress)


def _read_range(url: str, size: int) -> tuple[bytes, int] | None:
    """The first `size` bytes of `url` and the file's whole size; None when the server would send the
    whole file instead (no Range support)."""
    resp = _open(url, f"0-{size - 1}")
    if resp is None:
        raise FetchError(f"{url}: the file is empty")
    with resp:
        total = resp.headers.get("Content-Range", "").rpartition("/")[2]
        if resp.status != 206 or not total.isdigit():
            return None
        try:
            return resp.read(), int(total)
        except OSError as e:
            raise FetchError(f"{url}: cut off reading its header ({e})") from None


# GGUF metadata value types: fixed sizes by type id; 8 is a string, 9 an array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_header_length(data: bytes) -> int | None:
    """Where a GGUF file's tensor data begins (its header: metadata, tensor index, padding), read from
    its first bytes; None when `data` ends inside the header. FetchError when it is no GGUF (v2, v3)."""
    if len(data) >= 8 and (data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] not in (2, 3)):
        raise FetchError("not a GGUF file (version 2 or 3)")
    pos = 0

    def take(fmt: str):
        nonlocal pos
        out = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return out[0]

    def string() -> bytes:
        nonlocal pos
        n = take("<Q")
        if pos + n > len(data):
            raise struct.error("short")
        pos += n
        return data[pos - n:pos]

    def skip(kind: int) -> None:
        nonlocal pos
        if kind == 8:
            string()
        elif kind == 9:
            elem, count = take("<I"), take("<Q")
            if elem in _GGUF_SIZES:
                pos += _GGUF_SIZES[elem] * count
            else:
                for _ in range(count):
                    skip(elem)
        elif kind in _GGUF_SIZES:
            pos += _GGUF_SIZES[kind]
        else:
            raise FetchError(f"not a GGUF file: metadata value type {kind}")

    try:
        pos = 8
        n_tensors, n_kv = take("<Q"), take("<Q")
        alignment = 32
        for _ in range(n_kv):
            key, kind = string(), take("<I")
            if key == b"general.alignment" and kind == 4:
                alignment = take("<I")
            else:
                skip(kind)
        for _ in range(n_tensors):
            string()
            n_dims = take("<I")
            pos += 8 * n_dims + 4 + 8   # dims, type, offset
        if pos > len(data):
            return None
    except struct.error:
        return None
    return -(-pos // alignment) * alignment


def header_digest(path: Path) -> tuple[int, str]:
    """The length of a GGUF file's header and the sha256 of those bytes (to compare with another's)."""
    size = HEADER_FIRST_READ
    with open(path, "rb") as f:
        while True:
            f.seek(0)
            data = f.read(size)
            length = gguf_header_length(data)
            if length is not None:
                return length, prefix_digest(path, length)
            if len(data) < size or size >= MAX_HEADER_BYTES:
                raise FetchError(f"{path}: no GGUF header ends within the file's first {len(data)} bytes")
            size = min(4 * size, MAX_HEADER_BYTES)


def prefix_digest(path: Path, length: int) -> str:
    """sha256 of the first `length` bytes of a file (zeros past its end)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(length).ljust(length, b"\0")).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class Fetches:
    """Fetches running in the background, one per pinned file: an agent starts one when asked and
    answers with its progress until the file is there."""

    def __init__(self, cache: Path | None = None):
        self.cache = cache
        self._lock = threading.Lock()
        self._running: dict[str, tuple[Progress, threading.Thread]] = {}

    def ready(self, url: str, sha256: str) -> Path | None:
        path = local_path(url, sha256, self.cache)
        return path if path.is_file() else None

    def progress(self, url: str, sha256: str) -> Progress:
        """The file's progress, starting its fetch when none runs (a failed one is started again)."""
        if self.ready(url, sha256):
            size = local_path(url, sha256, self.cache).stat().st_size
            return Progress(done=True, bytes=size, total=size)
        with self._lock:
            run = self._running.get(sha256)
            if run is not None and run[1].is_alive():
                return run[0]
            if run is not None and run[0].error:   # said once; asked again, it is tried again
                del self._running[sha256]
                return run[0]
            p = Progress()
            t = threading.Thread(target=self._run, args=(url, sha256, p), name=f"fetch-{sha256[:8]}", daemon=True)
            self._running[sha256] = (p, t)
            t.start()
            return p

    def _run(self, url: str, sha256: str, p: Progress) -> None:
        try:
            fetch(url, sha256, self.cache, p)
        except FetchError as e:
            p.error = str(e)
            log.warning("fetching %s failed: %s", url, e)
        except Exception as e:  # noqa: BLE001 - said to whoever asks next
            p.error = f"{type(e).__name__}: {e}"
            log.exception("fetching %s failed", url)
