"""The kind config decodes strictly into kind's own types, and the kind workflow passes actionlint.

Both tools are Go programs: tools/kindcheck is built with `go run` (cached by Go), actionlint is
installed by scripts/tools.sh. Without Go these tests skip and say why.
"""
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _go():
    go = shutil.which("go")
    if not go:
        pytest.skip("go is not installed: cannot build tools/kindcheck or actionlint")
    return go


def test_kind_config_matches_kinds_v1alpha4_types():
    done = subprocess.run([_go(), "run", ".", str(ROOT / "manifests/kind/cluster.yaml")],
                          cwd=ROOT / "tools/kindcheck", capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    # Three labeled workers, one per machine of Test Case v1.
    assert done.stdout.count("consortium.io/accelerator:cuda") == 2
    assert done.stdout.count("consortium.io/accelerator:metal") == 1


def test_kindcheck_refuses_an_unknown_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodes:\n- role: worker\n  lables: {a: b}\n")
    done = subprocess.run([_go(), "run", ".", str(bad)], cwd=ROOT / "tools/kindcheck",
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and 'unknown field "lables"' in done.stderr


def _actionlint():
    found = shutil.which("actionlint")
    if found:
        return found
    _go()
    done = subprocess.run(["bash", str(ROOT / "scripts/tools.sh")], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.skip(f"scripts/tools.sh could not build actionlint: {done.stderr.strip()[-300:]}")
    path = pathlib.Path(done.stdout.strip().splitlines()[-1]) / "actionlint"
    if not path.is_file():
        pytest.skip(f"actionlint not installed by scripts/tools.sh: {done.stderr.strip()[-300:]}")
    return str(path)


def test_kind_workflow_passes_actionlint():
    workflow = ROOT / ".github/workflows/kind.yml"
    done = subprocess.run([_actionlint(), "-no-color", str(workflow)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ})
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    # Guards the test above against an actionlint that passes everything.
    broken = tmp_path / ".github/workflows/bad.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ matrix.nope }}\n")
    done = subprocess.run([_actionlint(), "-no-color", str(broken)], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0
