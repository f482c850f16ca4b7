"""The service definitions a bare agent runs under (manifests/nodes/bare/: launchd on the Mac,
systemd on Linux): they parse, they keep the agent running, and their command lines are ones the
agent accepts, with the same flags as the runbook's command for the Mac."""
from __future__ import annotations

import configparser
import pathlib
import plistlib
import re
import shlex

from node_agent import main as agent_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
BARE = ROOT / "manifests/nodes/bare"
FILLED = {"@REPO@": "/opt/consortium", "@HOME@": "/home/me", "@NODE@": "macbook", "@LAN_ADDRESS@": "192.168.1.20",
          "@USER@": "me"}


def filled(text: str) -> str:
    for k, v in FILLED.items():
        text = text.replace(k, v)
    assert "@" not in re.sub(r"<!--.*?-->|#.*", "", text, flags=re.S).replace("-->", ""), "a placeholder is left"
    return text


def flags(argv: list[str]) -> set[str]:
    return {a for a in argv if a.startswith("--")}


def runbook_flags() -> set[str]:
    """The flags of the runbook's command that starts the Mac's agent (section 3)."""
    text = (ROOT / "docs/runbook.md").read_text()
    block = re.search(r"\.venv/bin/node-agent (--listen 0\.0\.0\.0:50051.*?)> agent\.log", text, re.S).group(1)
    return flags(shlex.split(block.replace("\\\n", " ")))


def parse(argv: list[str]):
    args = agent_main.build_parser().parse_args(argv)   # SystemExit on a flag the agent does not know
    agent_main.parse_labels(args.labels)
    return args


def test_the_launchd_agent_keeps_the_macs_agent_running_with_the_runbooks_flags():
    plist = plistlib.loads(filled((BARE / "io.consortium.node-agent.plist").read_text()).encode())
    assert plist["Label"] == "io.consortium.node-agent"
    assert plist["KeepAlive"] is True and plist["RunAtLoad"] is True and plist["ThrottleInterval"] >= 5
    argv = plist["ProgramArguments"]
    assert argv[0] == "/opt/consortium/.venv/bin/node-agent"
    args = parse(argv[1:])
    assert args.kubeconfig == "/opt/consortium/agent.kubeconfig" and args.name == "macbook"
    assert "consortium.io/accelerator=metal" in args.labels
    assert flags(argv) == runbook_flags()


def test_the_systemd_unit_restarts_a_linux_agent_with_the_same_flags():
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str
    unit.read_string(filled((BARE / "consortium-node-agent.service").read_text()))
    svc = unit["Service"]
    assert svc["Restart"] == "always" and int(svc["RestartSec"]) >= 5
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    argv = shlex.split(svc["ExecStart"])
    assert argv[0] == "/opt/consortium/.venv/bin/node-agent"
    args = parse(argv[1:])
    assert args.kubeconfig and args.tls_cert and "consortium.io/accelerator=cuda" in args.labels
    assert flags(argv) == runbook_flags()

