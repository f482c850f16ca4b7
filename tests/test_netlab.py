"""netlab: a host in its own network namespace reaches a loopback service of the root namespace
through the forwarder; a cut link drops its traffic, a healed one carries it again; the delaying
proxy adds its latency; nothing is left behind, and a dead owner's leftovers are swept."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

from consortium import netlab

pytestmark = pytest.mark.skipif(netlab.available() is not None, reason=str(netlab.available()))

# Connects, sends 64 KB, reads the echo; prints the seconds it took or the error.
CLIENT = """
import socket, sys, time
t = time.monotonic()
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    s.settimeout(3)
    s.sendall(b"x" * 65536)
    n = 0
    while n < 65536:
        d = s.recv(65536)
        if not d:
            break
        n += len(d)
    print("ok", n, round(time.monotonic() - t, 3))
except OSError as e:
    print("error", type(e).__name__)
"""


@pytest.fixture()
def echo_port():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=c: [c.sendall(d) for d in iter(lambda: c.recv(65536), b"")],
                             daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def _talk(host: netlab.Host, fwd: netlab.Forwarder) -> list[str]:
    out = subprocess.run(host.prefix() + [sys.executable, "-c", CLIENT, fwd.address[0], str(fwd.address[1])],
                         capture_output=True, text=True, timeout=30)
    return out.stdout.split()


def _names() -> str:
    return (subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout +
            subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout)


def test_a_host_reaches_the_root_namespace_until_its_link_is_cut(echo_port):
    with netlab.Lab(["a", "b"]) as lab:
        a = lab.hosts["a"]
        assert a.address != lab.hosts["b"].address and a.netns in _names()
        fwd = lab.forward("127.0.0.1", echo_port)
        assert _talk(a, fwd)[:2] == ["ok", "65536"]
        a.cut()
        assert _talk(a, fwd)[0] == "error"
        a.heal()
        assert _talk(a, fwd)[:2] == ["ok", "65536"]
        fwd.delay_s = 0.2   # each direction: at least 0.4 s for the round trip
        res = _talk(a, fwd)
        assert res[:2] == ["ok", "65536"] and float(res[2]) >= 0.4, res
        fwd.delay_s = 0.0
        a.slow(kbit=256)
        assert "tbf" in subprocess.run(["tc", "qdisc", "show", "dev", a.link], capture_output=True, text=True).stdout
        a.restore()
        assert "tbf" not in subprocess.run(["tc", "qdisc", "show", "dev", a.link], capture_output=True,
                                           text=True).stdout
        netns, link, bridge = a.netns, a.link, lab.bridge
    left = _names()
    assert netns not in left and f"{link}@" not in left and bridge not in left


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="lower-case"):
        netlab.Lab(["Bad_Name"])
    with pytest.raises(ValueError, match="distinct"):
        netlab.Lab(["a", "a"])
    with pytest.raises(ValueError, match="delay"):
        netlab.Forwarder(("127.0.0.1", 0), ("127.0.0.1", 1), delay_s=-1)


def test_sweep_removes_what_a_dead_owner_left():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"{netlab.PREFIX}{dead.pid}-x"
    link = f"{netlab.PREFIX}{dead.pid:x}-0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name", link + "p"], check=True)
    try:
        removed = netlab.Lab.sweep()
        assert name in removed and link in removed
        assert name not in _names() and f"{link}@" not in _names()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", link], capture_output=True)
