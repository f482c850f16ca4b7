"""docs/runbook.md as a new user would follow it, as far as one machine without a GPU allows: its
`sh runnable` blocks run in order, in one shell, from the repository root, against a local control
plane of their own (the rehearsal of section 8); the last block stops everything, and runs even when
an earlier one failed. The rehearsal takes the runbook's normal path: mutual TLS on every agent link
and node-bound agent tokens, so plaintext appears only outside it, as the labeled shortcut."""
import os
import re
import subprocess
from pathlib import Path

import pytest

from consortium import cluster as lc

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "docs/runbook.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)


def blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced block."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)]


def runnable(text: str) -> list[str]:
    return [body for info, body in blocks(text) if info == "sh runnable"]


def test_every_block_is_marked_and_the_rehearsal_covers_the_steps():
    text = RUNBOOK.read_text()
    infos = {info for info, _ in blocks(text)}
    assert infos <= {"sh", "sh runnable"}, infos   # nothing unmarked slips past the test
    script = "\n".join(runnable(text))
    for step in ("consortium cluster up", "consortium certs", "create secret generic consortium-operator-tls",
                 "--bound-object-kind Node", "helm upgrade --install", "node-agent", "--tls-cert", "consortium-operator",
                 "kubectl apply -f manifests/sessions/sky-is-blue.yaml", "kill -9", "kubectl get receipts",
                 "consortium verify-receipts",
                 "kubectl get events", "consortium generate", "consortium cluster down"):
        assert step in script, step
    assert "--plaintext" not in script and "devPlaintext" not in script
    assert runnable(text)[-1].strip().endswith('consortium cluster down --state-dir "$REHEARSAL/cluster"')


@pytest.mark.k8s
@pytest.mark.slow
def test_the_rehearsal_runs_as_written(tmp_path):
    steps = runnable(RUNBOOK.read_text())
    env = {**os.environ, "REHEARSAL": str(tmp_path / "rehearsal")}
    env.pop("KUBECONFIG", None)
    env["PATH"] = f"{ROOT / '.venv/bin'}:{lc.ensure_binaries(build=True)}:{env['PATH']}"

    def bash(script: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=ROOT, env=env, text=True,
                              capture_output=True, timeout=timeout)

    try:
        run = bash("\n".join(steps[:-1]), 900)
    finally:
        down = bash(steps[-1], 120)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "identical to the baseline: True" in out, out[-3000:]
    for seen in ("mutual TLS as n0", "mutual TLS as n1", "mutual TLS as n2",
                 "Completed", "FailoverStarted", "StageReassigned", "FailoverFinished", "Passed",
                 "every position of every stage is covered"):
        assert seen in out, seen
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (tmp_path / "rehearsal/cluster").exists()
