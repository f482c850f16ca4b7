"""A session's evidence kept outside the cluster: the InferenceSession, the Receipts it owns and the
public keys of the nodes that signed them, in one file that `consortium verify-receipts --archive`
checks with no API server.

Why it exists: Receipts are owned by their session, so deleting a session (pruning the finished
ones, which the OpenAI endpoint makes one per request) deletes its evidence too; and once a node has
registered again under a new key, its older Receipts no longer verify against what the API
publishes. An archive keeps each signing node's key as it was published when the archive was made.
It is worth what those keys are worth: the fingerprints are printed with every check, to be
compared with the nodes' own when the file comes from someone else.
"""
from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import os
from pathlib import Path

from consortium import kube, receipt_check
from consortium import resources as r
from consortium.follow import FINAL_PHASES

KIND = "SessionArchive"
FORMAT_VERSION = 1
# What an archived object keeps of its metadata: enough to name it and to tie a Receipt to its
# session (ownerReferences carry the session's uid, which the signatures cover).
_METADATA = ("name", "namespace", "uid", "labels", "creationTimestamp", "ownerReferences")


class ArchiveError(ValueError):
    """A file that is not a readable session archive, with the reason."""


def _kept(obj: dict) -> dict:
    md = obj.get("metadata") or {}
    out = {"apiVersion": obj.get("apiVersion", r.API_VERSION), "kind": obj.get("kind"),
           "metadata": {k: md[k] for k in _METADATA if k in md}, "spec": obj.get("spec") or {}}
    if obj.get("status") is not None:
        out["status"] = obj["status"]
    return out


def fingerprint(public_key_b64: str) -> str:
    try:
        return hashlib.sha256(base64.b64decode(public_key_b64, validate=True)).hexdigest()
    except (binascii.Error, TypeError, ValueError):
        return "unreadable"


def build(session: dict, receipts: list[dict], nodes: list[dict], missing_nodes: list[str] = ()) -> dict:
    """The archive of `session` from objects read from the API: its own Receipts (not a deleted
    namesake's), and of each ComputeNode named by one of them the name and published key only."""
    uid = session["metadata"]["uid"]
    owned = sorted((it for it in receipts if kube.owned_by(it, uid)),
                   key=lambda it: (it["spec"]["stage"], it["spec"]["window"]["start"], it["spec"]["epoch"],
                                   it["metadata"]["name"]))
    named = {it["spec"]["node"] for it in owned}
    keys = [{"metadata": {"name": n["metadata"]["name"]}, "spec": {"publicKey": n["spec"]["publicKey"]},
             "fingerprint": fingerprint(n["spec"]["publicKey"])}
            for n in sorted(nodes, key=lambda n: n["metadata"]["name"])
            if n["metadata"]["name"] in named and (n.get("spec") or {}).get("publicKey")]
    doc = {"apiVersion": r.API_VERSION, "kind": KIND, "formatVersion": FORMAT_VERSION,
           "archivedAt": kube.timestamp(), "session": _kept(session),
           "receipts": [_kept(it) for it in owned], "computeNodes": keys,
           "missingNodes": sorted(set(missing_nodes) | (named - {k["metadata"]["name"] for k in keys}))}
    res = check(doc)
    doc["check"] = {k: res[k] for k in ("ok", "complete", "receipts", "verified", "tokens", "tokens_signed")}
    return doc


def collect(api, namespace: str, name: str) -> dict:
    """Read the session, its Receipts and their nodes' keys from the API and archive them. An
    ApiException from reading the session itself (404: no such session) is the caller's to report."""
    from kubernetes.client.exceptions import ApiException

    session = api.get_namespaced_custom_object(r.GROUP, r.VERSION, namespace, "inferencesessions", name)
    receipts = api.list_namespaced_custom_object(r.GROUP, r.VERSION, namespace, "receipts",
                                                 label_selector=f"{r.GROUP}/session={name}")["items"]
    nodes, missing = [], []
    for node in sorted({it["spec"]["node"] for it in receipts if kube.owned_by(it, session["metadata"]["uid"])}):
        try:
            nodes.append(api.get_cluster_custom_object(r.GROUP, r.VERSION, "computenodes", node))
        except ApiException as e:
            if e.status != 404:
                raise
            missing.append(node)   # deleted since: its Receipts are kept, but nothing here verifies them
    return build(session, receipts, nodes, missing)


def check(doc: dict) -> dict:
    """`consortium verify-receipts`'s check, on the archive alone; `archive` says whose keys it trusted."""
    res = receipt_check.check(doc["session"], doc["receipts"], doc["computeNodes"])
    res["archive"] = {"archivedAt": doc.get("archivedAt"), "missingNodes": doc.get("missingNodes") or [],
                      "keys": [{"node": n["metadata"]["name"], "fingerprint": fingerprint(n["spec"]["publicKey"])}
                               for n in doc["computeNodes"]]}
    return res


def file_name(doc_or_session: dict) -> str:
    """`<namespace>.<name>.<uid prefix>.json.gz`: a session deleted and made again under its name is
    another file."""
    md = (doc_or_session.get("session") or doc_or_session)["metadata"]
    return f"{md.get('namespace', 'default')}.{md['name']}.{md['uid'][:8]}.json.gz"


def write(doc: dict, path: str | os.PathLike) -> int:
    """Write the archive (gzip-compressed when the name ends in .gz), whole or not at all. Returns
    its size in bytes."""
    path = Path(path)
    data = json.dumps(doc, indent=1, sort_keys=True).encode()
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)


def read(path: str | os.PathLike) -> dict:
    """The archive in `path` (compressed or not, whatever its name), or ArchiveError saying why not."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ArchiveError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        doc = json.loads(raw)
    except (OSError, EOFError, ValueError) as e:
        raise ArchiveError(f"{path} is not a session archive: {type(e).__name__}: {e}") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise ArchiveError(f"{path} is not a session archive (kind {doc.get('kind') if isinstance(doc, dict) else None!r})")
    if doc.get("formatVersion") != FORMAT_VERSION:
        raise ArchiveError(f"{path} is a session archive of format {doc.get('formatVersion')!r}; "
                           f"this consortium reads format {FORMAT_VERSION}")
    try:
        session, receipts, nodes = doc["session"], doc["receipts"], doc["computeNodes"]
        session["metadata"]["name"], session["metadata"]["uid"]
        for it in receipts:
            it["spec"]["stage"], it["spec"]["window"]["start"], it["metadata"]["name"]
        for n in nodes:
            n["metadata"]["name"], n["spec"]["publicKey"]
    except (KeyError, TypeError) as e:
        raise ArchiveError(f"{path} is a damaged session archive: missing {e}") from None
    return doc


def key_lines(doc: dict) -> list[str]:
    """Whose keys an archive's check trusts, to compare with the nodes' own."""
    out = [f"keys as archived at {doc.get('archivedAt')}: "
           + (", ".join(f"{n['metadata']['name']} {fingerprint(n['spec']['publicKey'])[:16]}"
                        for n in doc["computeNodes"]) or "none")]
    if doc.get("missingNodes"):
        out.append(f"nodes deleted before the archive was made (their receipts cannot be verified): "
                   f"{', '.join(doc['missingNodes'])}")
    return out


def describe(doc: dict, path: str, size: int, ended: str = "") -> str:
    """One line per archive written: what it holds and whether its receipts verify."""
    md, st, c = doc["session"]["metadata"], doc["session"].get("status") or {}, doc["check"]
    phase = st.get("phase") or "Pending"
    if not c["receipts"]:
        verdict = "no receipts"
    elif c["ok"]:
        verdict = "all verify"
    else:
        verdict = f"check FAILS: {c['verified']} of {c['receipts']} verify" + ("" if c["complete"] else ", positions not covered")
    note = "" if phase in FINAL_PHASES else " (still running: its record so far)"
    return (f"{md.get('namespace')}/{md['name']}: {phase}{' ' + ended if ended else ''}{note}, {c['tokens']} tokens, {c['receipts']} receipts "
            f"({verdict}) -> {path} ({size / 1024:.1f} KiB)")


__all__ = ["ArchiveError", "KIND", "build", "check", "collect", "describe", "file_name", "fingerprint",
           "key_lines", "read", "write"]
