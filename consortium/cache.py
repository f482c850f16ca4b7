"""The one cache directory of Consortium, and files made into it once.

Everything derived and reusable lives under $CONSORTIUM_CACHE (default ~/.cache/consortium): stage
files, assembled and requantized models, the native capture callback, the Kubernetes binaries and
the local cluster's state. A cached file is written beside its final name and renamed, so a
concurrent or interrupted run never leaves a half-written file under that name.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def cache_dir() -> Path:
    return Path(os.environ.get("CONSORTIUM_CACHE") or Path.home() / ".cache" / "consortium")


def made_once(out: Path, make: Callable[[Path], object]) -> Path:
    """`out`, calling make(tmp_path) to write it first if it does not exist yet."""
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    try:
        make(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
