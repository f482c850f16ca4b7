"""Small C helpers, compiled once with the system's C compiler and cached under $CONSORTIUM_CACHE/native.

Each helper is one self-contained C file that includes only the C standard headers and links against
nothing. Callers keep a Python or numpy path that gives the same results and use it where no
compiler is found, the build fails, or CONSORTIUM_NO_NATIVE is set.

Images without a compiler ship the helpers prebuilt: `python -m consortium.native DIR` builds them
all into DIR (the Dockerfile's build stage does), and $CONSORTIUM_NATIVE_PREBUILT names that folder,
searched before the cache. A library's name carries a hash of its source, flags and platform, so a
stale one is never picked up.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import consortium.cache

# Every helper: (package, source inside it, optimization flag).
HELPERS = {
    "capture": ("node_agent", "engine/capture.c", "-O2"),          # the layer-output eval callback
    "canonical": ("consortium", "verification/canonical.c", "-O3"),  # grid indices; -O3 vectorizes
}

_build_lock = threading.Lock()


def helper(name: str) -> ctypes.CDLL | None:
    """One of HELPERS, loaded; None where it cannot be built."""
    package, rel, opt = HELPERS[name]
    return library(_source(package, rel), opt)


def _source(package: str, rel: str) -> Path:
    # Found without importing the package's modules (node_agent's engine would load llama.cpp).
    return Path(importlib.util.find_spec(package).submodule_search_locations[0]) / rel


def _file_name(src: Path, opt: str) -> str:
    key = hashlib.sha256(src.read_bytes() + opt.encode() + platform.machine().encode()
                         + sys.platform.encode()).hexdigest()[:16]
    return f"{src.stem}-{key}.so"


@functools.cache
def library(src: Path, opt: str = "-O2") -> ctypes.CDLL | None:
    """The shared library built from `src` with `opt`: prebuilt, cached, or built now; None if
    it cannot be built."""
    if os.environ.get("CONSORTIUM_NO_NATIVE"):
        return None
    src = Path(src)
    prebuilt = os.environ.get("CONSORTIUM_NATIVE_PREBUILT")
    if prebuilt and (Path(prebuilt) / _file_name(src, opt)).is_file():
        return ctypes.CDLL(str(Path(prebuilt) / _file_name(src, opt)))
    path = build(src, opt, consortium.cache.cache_dir() / "native")
    return None if path is None else ctypes.CDLL(str(path))


def build(src: Path, opt: str, folder: Path) -> Path | None:
    """Compile `src` into `folder` unless it is there already; its path, or None without a compiler
    or when the compiler fails."""
    out = folder / _file_name(src, opt)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not out.is_file() and not compiler:
        return None

    def compile_to(tmp: Path) -> None:
        subprocess.run([compiler, opt, "-shared", "-fPIC", "-o", str(tmp), str(src)], capture_output=True,
                       check=True)

    with _build_lock:   # threads of one process share made_once's temporary name
        try:
            return consortium.cache.made_once(out, compile_to)
        except subprocess.CalledProcessError:
            return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m consortium.native DIR   (builds every C helper into DIR)", file=sys.stderr)
        return 2
    for name, (package, rel, opt) in HELPERS.items():
        path = build(_source(package, rel), opt, Path(args[0]))
        if path is None:
            print(f"{name}: could not build {rel} (is a C compiler installed?)", file=sys.stderr)
            return 1
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
