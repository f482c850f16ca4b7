"""Small helpers shared by this folder's tests (the `cluster` fixture itself is in conftest.py)."""
from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parents[2]


def ensure_namespace(cluster, name: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))


def install_crds(cluster) -> None:
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    *[f"crd/{p}.consortium.io" for p in
                      ("inferencesessions", "stageassignments", "receipts", "computenodes")])


def apply(cluster, obj: dict[str, Any], namespace: str | None = None, *, token: str | None = None,
          check: bool = True):
    args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
    return cluster.kubectl(*args, input=json.dumps(obj), token=token, check=check)


def get_json(cluster, *args: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def headers(cluster, *args: str) -> list[str]:
    return cluster.kubectl("get", *args).stdout.splitlines()[0].split()


def eventually(check: Callable[[], Any], timeout: float = 30.0, every: float = 0.5):
    """Retries `check` until it returns without raising: RBAC and admission policies take effect
    a moment after they are created (the server's caches follow them)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(every)
