"""Several hosts on one Linux machine: network namespaces on a bridge, with faults on their links.

A Lab is a bridge in the root namespace (its address is the hosts' gateway) and one network
namespace per host, joined to the bridge by a veth pair, each with its own address. Processes run
in a host with `host.prefix() + argv`. A host's link can be cut (a partition: frames are dropped,
so TCP peers see silence, not a reset), healed, or slowed with a tbf rate limit on both directions
(this kernel has no netem). Services of the root namespace that listen on loopback (the API server)
are reached from the hosts through a Forwarder on the gateway address.

Forwarder is also the delaying proxy: with delay_s > 0 every chunk is held that long in each
direction (emulated latency; label such figures as emulated). A benchmark that must not share its
interpreter with the proxy runs it as a process of its own:

    python -m consortium.netlab LISTEN_HOST:PORT TARGET_HOST:PORT ONE_WAY_MS

which prints its bound port on stdout once listening (PORT may be 0) and runs until terminated.

Needs root (CAP_NET_ADMIN) and iproute2. Names carry the owning process id, so `Lab.sweep()` can
remove what a killed run left behind without touching another live run's lab:

    with netlab.Lab(["h0", "h1"]) as lab:
        p = subprocess.Popen(lab.hosts["h0"].prefix() + ["python", "-m", "http.server"])
        lab.hosts["h0"].cut(); lab.hosts["h0"].heal(); lab.hosts["h0"].slow(kbit=256)
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

PREFIX = "czl"   # namespace names: czl<pid>-<host>; links: czl<hex pid>-<index>[p] and czl<hex pid>-br
# (Linux caps link names at 15 characters; a pid has at most 6 hex digits)


class NetlabError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True, netns: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["ip"] + (["-n", netns] if netns else []) + list(args)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise NetlabError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return res


def _tc(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + ["tc"] + list(args)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise NetlabError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return res


def available() -> str | None:
    """None when labs can be made here, else why not."""
    if os.name != "posix" or not shutil.which("ip"):
        return "iproute2 (ip) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("tc"):
        return "tc (iproute2) is not installed"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.128.0.0/9 that no address or route of this machine overlaps."""
    used = []
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        m = re.match(r"(?:\S+ )?(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", line)
        if m:
            try:
                used.append(ipaddress.ip_network(m.group(1), strict=False))
            except ValueError:
                pass
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{random.randint(128, 254)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetlabError("no free /24 found in 10.128.0.0/9")


@dataclasses.dataclass
class Host:
    name: str
    netns: str
    address: str
    link: str        # the root namespace's end of the veth (a bridge port)
    peer: str        # the host's end, inside its namespace
    cut_now: bool = False
    slow_kbit: int | None = None

    def prefix(self) -> list[str]:
        """Prepend to an argv to run it inside this host."""
        return ["ip", "netns", "exec", self.netns]

    def cut(self) -> None:
        """Partition: the link goes down; frames to and from the host are dropped."""
        _ip("link", "set", self.link, "down")
        self.cut_now = True

    def heal(self) -> None:
        _ip("link", "set", self.link, "up")
        self.cut_now = False

    def slow(self, kbit: int, burst_bytes: int = 16384, latency_ms: int = 2000) -> None:
        """A slow link: a tbf rate limit on both ends of the veth (so both directions)."""
        if kbit <= 0:
            raise ValueError(f"rate must be positive, got {kbit} kbit/s")
        for netns, dev in ((None, self.link), (self.netns, self.peer)):
            _tc("qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{kbit}kbit", "burst", str(burst_bytes),
                "latency", f"{latency_ms}ms", netns=netns)
        self.slow_kbit = kbit

    def unslow(self) -> None:
        for netns, dev in ((None, self.link), (self.netns, self.peer)):
            _tc("qdisc", "del", "dev", dev, "root", netns=netns, check=False)
        self.slow_kbit = None

    def restore(self) -> None:
        """Back to a healthy link, whatever was done to it."""
        if self.cut_now:
            self.heal()
        if self.slow_kbit is not None:
            self.unslow()


class Lab:
    """A bridge, a gateway address on it, and one namespace per host name."""

    def __init__(self, names: list[str]):
        why = available()
        if why:
            raise NetlabError(why)
        if len(names) != len(set(names)) or not names or len(names) > 200:
            raise ValueError(f"host names must be 1-200 distinct names, got {names}")
        for n in names:
            if not re.fullmatch(r"[a-z0-9]{1,12}", n):
                raise ValueError(f"host name {n!r}: use 1-12 lower-case letters and digits")
        Lab.sweep()
        self.owner = os.getpid()
        self.tag = f"{PREFIX}{self.owner:x}-"
        self.bridge = f"{self.tag}br"
        if _ip("link", "show", self.bridge, check=False).returncode == 0:
            raise NetlabError(f"this process already has a lab ({self.bridge}); one per process")
        self.net = _free_subnet()
        addrs = list(self.net.hosts())
        self.gateway = str(addrs[0])
        self.hosts: dict[str, Host] = {}
        self._forwarders: list[Forwarder] = []
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/{self.net.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, name in enumerate(names):
                self._add_host(i, name, str(addrs[10 + i]))
        except BaseException:
            self.close()
            raise

    def _add_host(self, i: int, name: str, address: str) -> None:
        netns = f"{PREFIX}{self.owner}-{name}"
        link, peer = f"{self.tag}{i}", f"{self.tag}{i}p"
        _ip("netns", "add", netns)
        h = Host(name, netns, address, link, peer)
        self.hosts[name] = h
        _ip("link", "add", link, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", netns)
        _ip("link", "set", link, "master", self.bridge)
        _ip("link", "set", link, "up")
        _ip("addr", "add", f"{address}/{self.net.prefixlen}", "dev", peer, netns=netns)
        _ip("link", "set", peer, "up", netns=netns)
        _ip("link", "set", "lo", "up", netns=netns)
        _ip("route", "add", "default", "via", self.gateway, netns=netns)

    def forward(self, target_host: str, target_port: int, delay_s: float = 0.0) -> "Forwarder":
        """A Forwarder on the gateway address to a root-namespace service (e.g. the API server on
        loopback); stopped with the lab."""
        f = Forwarder((self.gateway, 0), (target_host, target_port), delay_s=delay_s).start()
        self._forwarders.append(f)
        return f

    def close(self) -> None:
        for f in self._forwarders:
            f.close()
        for h in self.hosts.values():
            _ip("link", "del", h.link, check=False)
            _ip("netns", "del", h.netns, check=False)
        _ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def sweep() -> list[str]:
        """Remove namespaces and links of labs whose owning process is gone; returns their names."""
        removed = []
        for line in _ip("netns", "list", check=False).stdout.splitlines():
            m = re.match(rf"({PREFIX}(\d+)-[a-z0-9]+)", line)
            if m and not _pid_alive(int(m.group(2))):
                _ip("netns", "del", m.group(1), check=False)
                removed.append(m.group(1))
        for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
            m = re.match(rf"\d+: ({PREFIX}([0-9a-f]+)-(?:br|\d+p?))[@:]", line)
            if m and not _pid_alive(int(m.group(2), 16)):
                _ip("link", "del", m.group(1), check=False)
                removed.append(m.group(1))
        return removed


class Forwarder:
    """A TCP forwarder from `listen` to `target`, optionally holding each chunk `delay_s` seconds in
    each direction (a delaying proxy: emulated latency). delay_s may be changed while it runs."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay_s: float = 0.0):
        if delay_s < 0:
            raise ValueError(f"delay must be >= 0, got {delay_s}")
        self.target, self.delay_s = target, delay_s
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(listen)
        self._sock.listen(64)
        self.address: tuple[str, int] = self._sock.getsockname()
        self._closed = threading.Event()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _thread(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, name=f"forward-{self.address[1]}", daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def start(self) -> "Forwarder":
        self._thread(self._accept)
        return self

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self._thread(self._pump, a, b)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Copy src to dst; with a delay, a second thread sends each chunk when it is due, so the
        link keeps its throughput and only gains latency."""
        line: "queue.Queue[tuple[float, bytes] | None]" = queue.Queue()

        def send() -> None:
            try:
                while (item := line.get()) is not None:
                    due, data = item
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)  # emulated latency, not compute
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                _shut(src, dst)

        self._thread(send)
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                line.put((time.monotonic() + self.delay_s, data))
        except OSError:
            pass
        finally:
            line.put(None)

    def close(self) -> None:
        """Stop it: every socket is shut down first, which wakes the threads blocked on them, and
        closed only once they have returned. (A socket closed under a blocked accept or recv frees its
        descriptor number while the thread may still retry on it, and would then act on whatever
        socket reuses that number in this process.)"""
        self._closed.set()
        _shut(self._sock)
        for _ in range(2):   # the accept thread first: it may still be starting a connection's threads
            with self._lock:
                socks, threads = list(self._conns), list(self._threads)
            _shut(*socks)
            for t in threads:
                t.join(timeout=5)
        for s in (self._sock, *socks):
            try:
                s.close()
            except OSError:
                pass


def _shut(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str]) -> int:
    """The delaying forwarder as a process (see the module's docstring)."""
    if len(argv) != 3:
        print("usage: python -m consortium.netlab LISTEN_HOST:PORT TARGET_HOST:PORT ONE_WAY_MS", file=sys.stderr)
        return 2
    try:
        listen, target, one_way_ms = _hostport(argv[0]), _hostport(argv[1]), float(argv[2])
        fwd = Forwarder(listen, target, delay_s=one_way_ms / 1000.0)
    except (ValueError, OSError) as e:
        print(f"forwarder: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    fwd.start()
    print(fwd.address[1], flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    fwd.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
