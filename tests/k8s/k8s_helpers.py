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


def run_cli(*args: str, cwd, timeout: float = 120):
    """`consortium ARGS` as a user runs it, from `cwd` outside the repository (whose operator/
    folder would shadow the standard library's module)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "consortium.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def register_nodes(cluster, names) -> dict:
    """ComputeNodes registered by the admin, each with a fresh Ed25519 key (returned by name)."""
    from consortium import resources as r
    from consortium.verification import signing

    keys = {name: signing.generate_private_key() for name in names}
    for name, key in keys.items():
        apply(cluster, {"apiVersion": r.API_VERSION, "kind": "ComputeNode", "metadata": {"name": name},
                        "spec": {"endpoint": f"{name}.example:7070", "publicKey": signing.public_key_text(key)}})
    return keys


def signed_ended_session(cluster, namespace: str, name: str, keys: dict, *, ago, labels: dict | None = None,
                         phase: str = "Completed", prompt: int = 6, tokens: int = 5, window: int = 4) -> dict:
    """A session with one stage per node of `keys` (in order), whose status the admin writes as
    ended `ago` (a timedelta; None: still Running) with `tokens` greedy tokens after a `prompt`, and
    the Receipts its nodes signed for every position fed, as the operator writes them (owned by it).
    No operator acts on it: this is for tests of what reads sessions and Receipts afterwards."""
    import hashlib

    from consortium import kube
    from consortium import resources as r
    from consortium.sampling import SamplingParams
    from consortium.verification import receipts, signing
    from consortium_operator.receipts import receipt_body

    nodes = list(keys)
    apply(cluster, {"apiVersion": r.API_VERSION, "kind": "InferenceSession",
                    "metadata": {"name": name, "labels": labels or {}},
                    "spec": {"model": {"name": "m", "file": "m.gguf"}, "prompt": "p", "maxTokens": tokens,
                             "stages": [{"layers": f"{10 * i}-{10 * i + 9}"} for i in range(len(nodes))]}}, namespace)
    status = {"phase": phase if ago is not None else "Running",
              "tokens": [100 + prompt - 1 + i for i in range(tokens)],   # token i sampled from row prompt-1+i
              "report": {"driverState": {"prompt_tokens": list(range(prompt)), "nodes": nodes}}}
    if ago is not None:
        status["finishedAt"] = kube.timestamp(kube.now() - ago)
    cluster.kubectl("patch", "inferencesession", name, "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": status}))
    s = get_json(cluster, "inferencesession", name, "-n", namespace)
    sid = r.session_id(namespace, name, s["metadata"]["uid"])
    for stage, node in enumerate(nodes):
        final = stage == len(nodes) - 1
        signer = receipts.WindowSigner(keys[node], session=sid, stage=stage, node_id=node, epoch=1, window=window)
        positions = list(range(prompt - 1 if final else 0, prompt + tokens - 1))
        for p in positions:
            signer.add(p, hashlib.sha256(b"in%d" % p).digest(), hashlib.sha256(b"out%d.%d" % (stage, p)).digest(),
                       (SamplingParams(), 100 + p) if final else None)
            if (p + 1) % window == 0 or p == positions[-1]:
                apply(cluster, receipt_body(s, {"stage": stage, "node": node, "epoch": 1,
                                                "receipt": signer.receipt().to_json()},
                                            signing.public_key_text(keys[node])), namespace)
    return s
