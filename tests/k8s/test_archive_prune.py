"""`consortium archive`, `verify-receipts --archive` and `consortium prune` on a real API server:
sessions whose status the admin writes (no operator runs in this folder's tests) and Receipts
signed with real node keys, owned by their session as the operator writes them."""
from __future__ import annotations

import datetime as dt
import gzip
import json
import subprocess

import pytest

from consortium import archive
from consortium import resources as r
from consortium.verification import signing

from k8s_helpers import (ensure_namespace, eventually, get_json, install_crds, register_nodes, run_cli,
                         signed_ended_session)

pytestmark = pytest.mark.k8s

NS = "archive-prune"
PROMPT, TOKENS, WINDOW = 6, 5, 4   # positions fed: 0..9 (the last token is never fed back)
NODES = ("arch-a", "arch-b")       # stage 0, stage 1 (final)


def consortium(tmp_path, *args) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=tmp_path)


def keys_fp(key) -> str:
    return archive.fingerprint(signing.public_key_text(key))[:16]


@pytest.fixture(scope="module")
def keys(cluster):
    install_crds(cluster)
    ensure_namespace(cluster, NS)
    made = register_nodes(cluster, NODES)
    yield made
    cluster.kubectl("delete", "computenode", *NODES, "--ignore-not-found")


def ended_session(cluster, keys, name, **kw) -> dict:
    return signed_ended_session(cluster, NS, name, keys, prompt=PROMPT, tokens=TOKENS, window=WINDOW, **kw)


def receipts_of(cluster, name: str) -> list[dict]:
    return get_json(cluster, "receipts", "-n", NS, "-l", f"{r.GROUP}/session={name}")["items"]


def test_an_archive_verifies_offline_and_a_changed_one_does_not(cluster, keys, tmp_path):
    s = ended_session(cluster, keys, "kept-evidence", ago=dt.timedelta(hours=1))
    out = tmp_path / "kept.json.gz"
    made = consortium(tmp_path, "archive", "kept-evidence", "-n", NS, "--kubeconfig", cluster.kubeconfig, "-o", str(out))
    assert made.returncode == 0, made.stderr
    assert "Completed" in made.stdout and "all verify" in made.stdout
    doc = archive.read(out)
    assert doc["session"]["metadata"]["uid"] == s["metadata"]["uid"]
    assert len(doc["receipts"]) == len(receipts_of(cluster, "kept-evidence")) == 3 + 2   # 10 rows and 6 in windows of 4
    assert [n["metadata"]["name"] for n in doc["computeNodes"]] == list(NODES)
    assert "managedFields" not in doc["session"]["metadata"] and doc["check"]["ok"]

    # The node registers again under a new key: the API can no longer vouch for its old Receipts,
    # the archive, holding the key it published then, still can.
    cluster.kubectl("patch", "computenode", "arch-a", "--type=merge", "-p", json.dumps(
        {"spec": {"publicKey": signing.public_key_text(signing.generate_private_key())}}))
    try:
        live = consortium(tmp_path, "verify-receipts", "kept-evidence", "-n", NS, "--kubeconfig", cluster.kubeconfig)
        assert live.returncode == 1 and "DOES NOT VERIFY" in live.stdout, live.stdout
        offline = consortium(tmp_path, "verify-receipts", "--archive", str(out), "--json", str(tmp_path / "res.json"))
        assert offline.returncode == 0, offline.stdout + offline.stderr
        assert "keys as archived at" in offline.stdout and "arch-a " + keys_fp(keys["arch-a"]) in offline.stdout
        res = json.loads((tmp_path / "res.json").read_text())
        assert res["ok"] and res["verified"] == 5 and res["tokens_signed"] == TOKENS
        assert {k["node"] for k in res["archive"]["keys"]} == set(NODES)
    finally:
        cluster.kubectl("patch", "computenode", "arch-a", "--type=merge", "-p", json.dumps(
            {"spec": {"publicKey": signing.public_key_text(keys["arch-a"])}}))

    # A token changed in the archive is contradicted by the final stage's signature; damage is named.
    doc["session"]["status"]["tokens"][2] += 1
    archive.write(doc, tmp_path / "changed.json")
    changed = consortium(tmp_path, "verify-receipts", "--archive", str(tmp_path / "changed.json"))
    assert changed.returncode == 1 and "TOKEN 2: the session shows" in changed.stdout
    (tmp_path / "cut.json.gz").write_bytes(out.read_bytes()[:200])
    cut = consortium(tmp_path, "verify-receipts", "--archive", str(tmp_path / "cut.json.gz"))
    assert cut.returncode == 2 and "is not a session archive" in cut.stderr
    (tmp_path / "other.json").write_text(json.dumps({"kind": "Receipt"}))
    other = consortium(tmp_path, "verify-receipts", "--archive", str(tmp_path / "other.json"))
    assert other.returncode == 2 and "kind 'Receipt'" in other.stderr
    assert json.loads(gzip.decompress(out.read_bytes()))["kind"] == archive.KIND


def test_prune_archives_then_deletes_only_what_ended_long_enough_ago(cluster, keys, tmp_path):
    api_label = {f"{r.GROUP}/created-by": "openai-api"}
    old = ended_session(cluster, keys, "old-chat", ago=dt.timedelta(days=3), labels=api_label)
    failed = ended_session(cluster, keys, "old-failed-chat", ago=dt.timedelta(days=2), labels=api_label, phase="Failed")
    ended_session(cluster, keys, "new-chat", ago=dt.timedelta(minutes=5), labels=api_label)
    ended_session(cluster, keys, "running-chat", ago=None, labels=api_label)
    ended_session(cluster, keys, "old-by-hand", ago=dt.timedelta(days=3))
    kc = ["--kubeconfig", cluster.kubeconfig, "-n", NS]
    selector = ["-l", f"{r.GROUP}/created-by=openai-api"]

    dry = consortium(tmp_path, "prune", *kc, *selector, "--finished-before", "1d", "--archive-dir",
                     str(tmp_path / "dry"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "2 of 4 sessions" in dry.stderr and dry.stdout.count("would be archived") == 2
    assert not (tmp_path / "dry").exists() and len(receipts_of(cluster, "old-chat")) == 5

    refused = consortium(tmp_path, "prune", *kc, "--finished-before", "1d")
    assert refused.returncode == 2 and "--archive-dir" in refused.stderr   # evidence kept unless told otherwise

    done = consortium(tmp_path, "prune", *kc, *selector, "--finished-before", "1d", "--archive-dir", str(tmp_path / "a"))
    assert done.returncode == 0, done.stderr
    assert "2 of 2 sessions pruned" in done.stderr and done.stdout.count("deleted") == 2
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert names == {archive.file_name(old), archive.file_name(failed)}

    left = {s["metadata"]["name"] for s in get_json(cluster, "inferencesessions", "-n", NS)["items"]}
    assert {"new-chat", "running-chat", "old-by-hand"} <= left and not {"old-chat", "old-failed-chat"} & left

    def receipts_collected():   # by the garbage collector: the session owned them
        assert receipts_of(cluster, "old-chat") == [] and receipts_of(cluster, "old-failed-chat") == []
    eventually(receipts_collected, timeout=90, every=1)
    assert len(receipts_of(cluster, "new-chat")) == 5

    # What was deleted is still checkable from its archive alone.
    for f in sorted((tmp_path / "a").iterdir()):
        again = consortium(tmp_path, "verify-receipts", "--archive", str(f))
        assert again.returncode == 0 and "OK: all 5 receipts verify" in again.stdout, again.stdout

    nothing = consortium(tmp_path, "prune", *kc, *selector, "--finished-before", "1d", "--no-archive")
    assert nothing.returncode == 0 and "0 of 2 sessions" in nothing.stderr
