"""Separate hosts on one machine: a network namespace per node, joined to the root namespace by a veth.

Each host gets 10.213.<k>.2 inside its namespace and the root side 10.213.<k>.1, so traffic between the
benchmark (root namespace) and a node crosses a real network stack boundary instead of loopback.
Needs root (CAP_NET_ADMIN) and `ip`; `available()` says why not when it cannot.
"""
from __future__ import annotations

import os
import shutil
import subprocess


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if shutil.which("ip") is None:
        return "the ip command is missing"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"cbprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as e:
        return str(e)
    _ip("netns", "del", probe)
    return None


class Hosts:
    """Context manager: n namespaces named after this process, removed on exit."""

    def __init__(self, n: int):
        self.n = n
        tag = os.getpid() % 100000
        self.names = [f"cb{tag}n{i}" for i in range(n)]
        # A third octet block per process, so two benchmarks at once do not collide.
        base = (tag % 60) * 4
        self.addresses = [f"10.213.{base + i}.2" for i in range(n)]
        self._made: list[str] = []

    def __enter__(self) -> "Hosts":
        try:
            for i, ns in enumerate(self.names):
                host_if, ns_if = f"{ns}h", f"{ns}v"
                octets = self.addresses[i].rsplit(".", 1)[0]
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
                _ip("link", "set", ns_if, "netns", ns)
                _ip("addr", "add", f"{octets}.1/24", "dev", host_if)
                _ip("link", "set", host_if, "up")
                _ip("-n", ns, "addr", "add", f"{octets}.2/24", "dev", ns_if)
                _ip("-n", ns, "link", "set", ns_if, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in self._made:
            subprocess.run(["ip", "link", "del", f"{ns}h"], capture_output=True)  # also removes the peer
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made = []

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]]
