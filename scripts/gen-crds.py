#!/usr/bin/env python3
"""Writes the CustomResourceDefinitions generated from consortium/resources.py into crds/ and the chart.

Usage: scripts/gen-crds.py          write the files
       scripts/gen-crds.py --check  exit 1 and name the stale files if they differ from the models
"""
import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from consortium import crdgen  # noqa: E402

# Helm installs the files in a chart's crds/ folder as they are; a copy, because a symlink does not
# survive `helm package`.
TARGETS = [ROOT / "crds", ROOT / "charts" / "consortium" / "crds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args()
    wanted = crdgen.render_all()
    stale = []
    for folder in TARGETS:
        present = {p.name for p in folder.glob("*.yaml")} if folder.is_dir() else set()
        for name, text in wanted.items():
            path = folder / name
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
                if not args.check:
                    folder.mkdir(parents=True, exist_ok=True)
                    path.write_text(text)
        for extra in sorted(present - set(wanted)):
            stale.append(folder / extra)
            if not args.check:
                (folder / extra).unlink()
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'}: {path.relative_to(ROOT)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
