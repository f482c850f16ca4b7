"""A real local Kubernetes control plane: etcd, kube-apiserver and kube-controller-manager.

The binaries are built from the Go module proxy by scripts/k8s-binaries.sh and cached by version
(pins in scripts/k8s-versions.env). Everything listens on loopback ports picked at start; the
certificates are generated here. There is no kubelet and no scheduler: pods stay Pending, which is
why operators and agents are run as plain processes against this API server in tests.

    cluster = LocalCluster(state_dir)
    cluster.start()            # or start(detach=True) for processes that outlive this one
    cluster.kubectl("get", "ns")
    cluster.stop()             # SIGTERM, then SIGKILL; removes the state dir
"""
from __future__ import annotations

import base64
import datetime
import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import consortium.cache

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "scripts"
VERSIONS_FILE = SCRIPTS / "k8s-versions.env"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kubectl", "etcd", "helm")
STATE_FILE = "cluster.json"
SERVICE_CIDR = "10.0.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Controllers that matter without kubelets: namespace deletion, ownerReference garbage collection,
# ServiceAccounts and their tokens, the kube-root-ca.crt ConfigMap, aggregated ClusterRoles
# (admin/edit/view), and the workload controllers so a chart's Deployment gets its ReplicaSet.
CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "deployment-controller",
    "replicaset-controller",
    "daemonset-controller",
    "job-controller",
)
# Stop order: clients of the API server first, etcd last.
STOP_ORDER = ("kube-controller-manager", "kube-apiserver", "etcd")


class ClusterError(RuntimeError):
    pass


class CommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message carries the command's stderr, which is where kubectl says why."""

    def __str__(self) -> str:
        err = self.stderr.strip() if isinstance(self.stderr, str) else ""
        return f"{' '.join(map(str, self.cmd))} exited {self.returncode}: {err}"


def log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


# --- versions and binaries ------------------------------------------------------------------------

def versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """The pins shared with scripts/k8s-binaries.sh: KUBERNETES_VERSION, ETCD_VERSION, HELM_VERSION."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def cache_root() -> Path:
    return consortium.cache.cache_dir()


def expected_bin_dir() -> Path:
    v = versions()
    key = f"{v['KUBERNETES_VERSION']}-etcd{v['ETCD_VERSION'].lstrip('v')}-helm{v['HELM_VERSION'].lstrip('v')}"
    return cache_root() / "k8s" / key / "bin"


def binaries_present(bin_dir: Path | None = None) -> bool:
    bin_dir = bin_dir or expected_bin_dir()
    return all(os.access(bin_dir / b, os.X_OK) for b in BINARIES)


def ensure_binaries(build: bool = True) -> Path:
    """The cached bin dir, building it with scripts/k8s-binaries.sh first if needed (tens of minutes)."""
    override = os.environ.get("CONSORTIUM_K8S_BIN_DIR")
    if override:
        return Path(override)
    bin_dir = expected_bin_dir()
    if binaries_present(bin_dir):
        return bin_dir
    if not build:
        raise ClusterError(f"Kubernetes binaries not built; run {SCRIPTS / 'k8s-binaries.sh'}")
    log("building the control plane binaries (once per version; see scripts/k8s-binaries.sh)")
    res = subprocess.run([str(SCRIPTS / "k8s-binaries.sh"), "--print-bin-dir"],
                         stdout=subprocess.PIPE, text=True, check=True)
    return Path(res.stdout.strip().splitlines()[-1])


# --- certificates -----------------------------------------------------------------------------------

def _write_pki(pki: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    pki.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str, org: str | None = None) -> x509.Name:
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if org:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        return x509.Name(attrs)

    def write_key(key: Any, stem: str) -> None:
        path = pki / f"{stem}.key"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)

    def write_cert(cert: x509.Certificate, stem: str) -> None:
        (pki / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def sign(subject: x509.Name, key: Any, issuer: tuple[x509.Name, Any] | None, *, ca: bool = False,
             usage: list | None = None, sans: list | None = None) -> x509.Certificate:
        issuer_name, issuer_key = issuer if issuer else (subject, key)
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=365))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                critical=True)
            b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        else:
            b = b.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                                critical=True)
            b = b.add_extension(x509.ExtendedKeyUsage(usage or []), critical=False)
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def new_key() -> Any:
        # P-256 keys: generated in microseconds, unlike RSA, which keeps `up` fast.
        return ec.generate_private_key(ec.SECP256R1())

    # Serving CA (what clients trust) and client CA (what the API server trusts) are separate, as in a
    # real cluster: a serving certificate can never be used to log in.
    ca_key, client_ca_key = new_key(), new_key()
    ca = sign(name("consortium-local-ca"), ca_key, None, ca=True)
    client_ca = sign(name("consortium-local-client-ca"), client_ca_key, None, ca=True)
    write_cert(ca, "ca")
    write_key(ca_key, "ca")
    write_cert(client_ca, "client-ca")

    serving_key = new_key()
    dns = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
           "kubernetes.default.svc.cluster.local"]
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                             x509.IPAddress(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))]
    write_cert(sign(name("kube-apiserver"), serving_key, (ca.subject, ca_key),
                    usage=[ExtendedKeyUsageOID.SERVER_AUTH], sans=sans), "apiserver")
    write_key(serving_key, "apiserver")

    # Group system:masters bypasses RBAC: the admin. The controller manager logs in as the user the
    # API server's bootstrap RBAC already binds (system:kube-controller-manager).
    for stem, cn, org in (("admin", "consortium-admin", "system:masters"),
                          ("controller-manager", "system:kube-controller-manager", None)):
        key = new_key()
        write_cert(sign(name(cn, org), key, (client_ca.subject, client_ca_key),
                        usage=[ExtendedKeyUsageOID.CLIENT_AUTH]), stem)
        write_key(key, stem)

    # Signs ServiceAccount tokens (TokenRequest in the API server, legacy secrets in the controller
    # manager); RSA because RS256 is what every token consumer accepts.
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_key(sa_key, "sa")
    (pki / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def free_port() -> int:
    """A loopback TCP port nobody listens on now (free until someone takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- processes --------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A zombie still answers kill(0) but is gone for our purposes.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _pid_is(pid: int, binary: str) -> bool:
    """Whether pid is alive and still runs `binary` (guards against a recycled pid)."""
    if not _pid_alive(pid):
        return False
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()
    except OSError:
        return True  # no /proc (macOS): trust the pid
    return Path(argv0).name == binary


def _set_pdeathsig() -> None:
    # Attached mode: if the Python process dies without cleaning up, the kernel kills the child.
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class LocalCluster:
    """One control plane under `state_dir` (certificates, etcd data, logs, kubeconfig, cluster.json)."""

    def __init__(self, state_dir: str | os.PathLike, bin_dir: str | os.PathLike | None = None):
        self.state_dir = Path(state_dir).resolve()
        self._bin_dir = Path(bin_dir) if bin_dir else None
        self.pki = self.state_dir / "pki"
        self.kubeconfig = str(self.state_dir / "kubeconfig")
        self.logs_dir = self.state_dir / "logs"
        v = versions()
        self.version = v["KUBERNETES_VERSION"]
        self.etcd_version = v["ETCD_VERSION"]
        self.helm_version = v["HELM_VERSION"]
        self.server: str | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._pids: dict[str, int] = {}
        self._cmds: dict[str, tuple[list[str], bool]] = {}   # how each component was started here
        self.start_seconds: float | None = None
        self._load_state()

    # -- paths and state

    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            self._bin_dir = ensure_binaries()
        return self._bin_dir

    @property
    def ca_file(self) -> str:
        return str(self.pki / "ca.crt")

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def _load_state(self) -> None:
        try:
            st = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return
        self.server = st.get("server")
        self._pids = {k: int(v) for k, v in st.get("pids", {}).items()}
        if st.get("bin_dir") and self._bin_dir is None:
            self._bin_dir = Path(st["bin_dir"])

    def _save_state(self, **extra: Any) -> None:
        st = {"server": self.server, "pids": self._pids, "bin_dir": str(self._bin_dir),
              "kubeconfig": self.kubeconfig, "version": self.version, **extra}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(st, indent=2) + "\n")
        tmp.replace(self.state_file)

    @property
    def pids(self) -> dict[str, int]:
        """The recorded process id of each component."""
        return dict(self._pids)

    def processes(self) -> dict[str, bool]:
        """Each recorded component and whether its process is alive."""
        return {name: _pid_is(pid, name) for name, pid in self._pids.items()}

    def is_running(self) -> bool:
        procs = self.processes()
        return bool(procs) and all(procs.values()) and set(procs) == set(STOP_ORDER)

    def is_ready(self) -> bool:
        try:
            return self._get("/readyz")[0] == 200
        except (OSError, ssl.SSLError, ClusterError, http.client.HTTPException):
            return False

    # -- start / stop

    def start(self, detach: bool = False, timeout: float = 180.0) -> "LocalCluster":
        """Start the three processes and wait until the API server and the controllers work.

        detach=True: the processes outlive this Python process (`consortium cluster up`);
        otherwise the kernel kills them if this process dies (pytest).
        """
        if self.is_running():
            raise ClusterError(f"already running in {self.state_dir}")
        if self._pids:
            log(f"removing stale state in {self.state_dir}")
            self.stop()
        t0 = time.monotonic()
        bin_dir = self.bin_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        self._pids = {}
        self._save_state(starting=True)  # marks the directory as ours before anything else lands in it
        _write_pki(self.pki)
        etcd_port, peer_port, api_port, kcm_port = (free_port() for _ in range(4))
        self.server = f"https://127.0.0.1:{api_port}"
        try:
            self._spawn("etcd", [
                str(bin_dir / "etcd"), "--name=default", f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                # Throwaway data: skipping fsync makes etcd (and so every API write) far faster.
                "--unsafe-no-fsync", "--log-level=warn",
            ], detach)
            self._wait(lambda: self._etcd_healthy(etcd_port), timeout, "etcd healthy")
            pki = self.pki
            self._spawn("kube-apiserver", [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
                f"--cert-dir={self.state_dir / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'client-ca.crt'}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # The `kubernetes` Service cannot have a loopback endpoint; nothing in-cluster needs it.
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true", "--profiling=false",
            ], detach)
            self._wait(self.is_ready, timeout, "kube-apiserver /readyz")
            self._write_kubeconfigs()
            self._spawn("kube-controller-manager", [
                str(bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.state_dir / 'controller-manager.kubeconfig'}",
                f"--authentication-kubeconfig={self.state_dir / 'controller-manager.kubeconfig'}",
                f"--authorization-kubeconfig={self.state_dir / 'controller-manager.kubeconfig'}",
                # No front proxy here: name the client CA directly instead of looking up the
                # requestheader CA in kube-system (which does not exist and floods the log).
                "--authentication-skip-lookup=true", f"--client-ca-file={pki / 'client-ca.crt'}",
                "--bind-address=127.0.0.1", f"--secure-port={kcm_port}",
                f"--cert-dir={self.state_dir / 'controller-manager-certs'}",
                "--leader-elect=false",
                # Each controller acts with its own ServiceAccount, under the bootstrap RBAC roles.
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--controllers={','.join(CONTROLLERS)}",
            ], detach)
            self._wait(self._service_accounts_work, timeout, "ServiceAccounts and tokens in namespace default")
        except BaseException:
            self._dump_logs()
            self.stop(remove=False)
            raise
        self.start_seconds = time.monotonic() - t0
        self._save_state(started=time.time(), start_seconds=round(self.start_seconds, 2))
        log(f"{self.version} up at {self.server} in {self.start_seconds:.1f}s (state in {self.state_dir})")
        return self

    def stop(self, remove: bool = True, grace: float = 15.0) -> None:
        """SIGTERM each component (controllers first, etcd last), SIGKILL after `grace` seconds."""
        for name in STOP_ORDER:
            pid = self._pids.get(name)
            if pid is None or not _pid_is(pid, name):
                continue
            try:
                os.killpg(pid, signal.SIGTERM)  # its own session and group: catches any children too
            except ProcessLookupError:
                continue
            if not self._wait_exit(name, pid, grace):
                log(f"{name} ignored SIGTERM for {grace:.0f}s; killing")
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._wait_exit(name, pid, 5.0)
        self._pids = {}
        self._procs = {}
        if remove and self.state_dir.exists():
            if not (self.state_file.exists() or self.state_file.with_suffix(".tmp").exists()):
                raise ClusterError(f"refusing to remove {self.state_dir}: no {STATE_FILE} in it")
            shutil.rmtree(self.state_dir, ignore_errors=True)
        elif self.state_dir.exists():
            self._save_state(stopped=time.time())

    def _wait_exit(self, name: str, pid: int, seconds: float) -> bool:
        proc = self._procs.get(name)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if proc is not None:
                if proc.poll() is not None:
                    return True
            elif not _pid_alive(pid):
                return True
            time.sleep(0.05)
        return False

    def restart_apiserver(self, down_s: float = 0.0, timeout: float = 60.0,
                          while_down: Callable[[], Any] | None = None, graceful: bool = False) -> float:
        """Kill kube-apiserver (as a crash or a server's reboot would), or with `graceful` stop it
        with SIGTERM (as an upgrade would: it goes on serving for a while, then drains), call
        `while_down`, wait `down_s` seconds, start it again as before (same port, same etcd).
        Returns the seconds from the signal until it is ready again. Only for a cluster started by
        this process, and from the thread that started it (its components die with that thread:
        PR_SET_PDEATHSIG)."""
        cmd, detach = self._cmds.get("kube-apiserver", (None, False))
        proc = self._procs.get("kube-apiserver")
        if cmd is None or proc is None:
            raise ClusterError("restart_apiserver: kube-apiserver was not started by this process")
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
        if not self._wait_exit("kube-apiserver", proc.pid, 90.0 if graceful else 10.0):
            raise ClusterError("restart_apiserver: kube-apiserver did not exit")
        if while_down is not None:
            while_down()
        time.sleep(down_s)
        self._spawn("kube-apiserver", cmd, detach)
        self._wait(self.is_ready, timeout, "kube-apiserver /readyz after its restart")
        return time.monotonic() - t0

    def pause_apiserver(self, seconds: float, while_paused: Callable[[], Any] | None = None) -> None:
        """Stop kube-apiserver (SIGSTOP) for `seconds`, calling `while_paused` meanwhile, then let it
        go on: a server that hangs, its connections open and nothing answered, as behind a link that
        drops packets. Works on a detached cluster too."""
        pid = self._pids.get("kube-apiserver")
        if pid is None or not _pid_is(pid, "kube-apiserver"):
            raise ClusterError("pause_apiserver: kube-apiserver is not running")
        t0 = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            if while_paused is not None:
                while_paused()
            time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
        finally:
            os.kill(pid, signal.SIGCONT)

    def _spawn(self, name: str, cmd: list[str], detach: bool) -> None:
        self._cmds[name] = (cmd, detach)
        with open(self.logs_dir / f"{name}.log", "ab") as logf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    cwd=self.state_dir, start_new_session=True,
                                    preexec_fn=None if detach else _set_pdeathsig)
        self._procs[name] = proc
        self._pids[name] = proc.pid
        self._save_state(starting=True)

    def _wait(self, check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with {proc.returncode} while waiting for {what}; "
                                       f"see {self.logs_dir / (name + '.log')}")
            if check():
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.logs_dir}")
            time.sleep(0.1)

    def _dump_logs(self, lines: int = 20) -> None:
        for f in sorted(self.logs_dir.glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            log(f"--- last lines of {f.name}:\n" + "\n".join(tail))

    # -- HTTP checks with the admin certificate (no client library needed)

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        ctx.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        return ctx

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        if not self.server:
            raise ClusterError("not started")
        host, port = self.server.removeprefix("https://").rsplit(":", 1)
        conn = http.client.HTTPSConnection(host, int(port), context=self._ssl_context(), timeout=5)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _get(self, path: str) -> tuple[int, bytes]:
        return self._request("GET", path)

    def _etcd_healthy(self, port: int) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/health")
            return json.loads(conn.getresponse().read()).get("health") == "true"
        except (OSError, ValueError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def _service_accounts_work(self) -> bool:
        # The ServiceAccount controller has made `default` in namespace default, and the API server
        # issues a token for it (TokenRequest): what `kubectl create token` needs.
        try:
            status, _ = self._get("/api/v1/namespaces/default/serviceaccounts/default")
            if status != 200:
                return False
            status, _ = self._request("POST", "/api/v1/namespaces/default/serviceaccounts/default/token",
                                      {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                       "spec": {"expirationSeconds": 600}})
            return status == 201
        except (OSError, ssl.SSLError, http.client.HTTPException):
            return False

    # -- kubeconfigs

    def kubeconfig_dict(self, *, token: str | None = None, cert: str | None = "admin") -> dict:
        """A kubeconfig with embedded data: the admin certificate, another client certificate, or a token."""
        user: dict[str, str] = {}
        if token is not None:
            user["token"] = token
        elif cert is not None:
            user["client-certificate-data"] = _b64(self.pki / f"{cert}.crt")
            user["client-key-data"] = _b64(self.pki / f"{cert}.key")
        return {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "consortium-local",
                          "cluster": {"server": self.server,
                                      "certificate-authority-data": _b64(self.pki / "ca.crt")}}],
            "users": [{"name": "user", "user": user}],
            "contexts": [{"name": "consortium-local", "context": {"cluster": "consortium-local", "user": "user"}}],
            "current-context": "consortium-local",
        }

    def write_kubeconfig(self, path: str | os.PathLike, *, token: str | None = None) -> str:
        """Write a kubeconfig for this cluster: admin by default, or one that logs in with `token`
        (for running the operator or an agent as a ServiceAccount)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # JSON is valid YAML, and every kubeconfig reader accepts it.
        path.write_text(json.dumps(self.kubeconfig_dict(token=token), indent=2) + "\n")
        path.chmod(0o600)
        return str(path)

    def _write_kubeconfigs(self) -> None:
        self.write_kubeconfig(self.kubeconfig)
        p = self.state_dir / "controller-manager.kubeconfig"
        p.write_text(json.dumps(self.kubeconfig_dict(cert="controller-manager"), indent=2) + "\n")
        p.chmod(0o600)
        p = self.state_dir / "anonymous.kubeconfig"
        p.write_text(json.dumps(self.kubeconfig_dict(cert=None), indent=2) + "\n")

    # -- tools

    def _run(self, tool: str, args: tuple, *, check: bool, input: str | None,
             env: dict[str, str] | None = None, timeout: float | None = 300) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / tool), *map(str, args)]
        res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, **(env or {})})
        if check and res.returncode != 0:
            raise CommandError(res.returncode, cmd, res.stdout, res.stderr)
        return res

    def kubectl(self, *args: Any, check: bool = True, input: str | None = None,
                token: str | None = None, timeout: float | None = 300) -> subprocess.CompletedProcess:
        """Run the built kubectl against this cluster, as admin or, with `token`, as whoever owns it."""
        if token is None:
            base = ("--kubeconfig", self.kubeconfig)
        else:
            # A kubeconfig without a client certificate: otherwise the certificate would win and the
            # request would run as admin.
            base = ("--kubeconfig", str(self.state_dir / "anonymous.kubeconfig"), "--token", token)
        return self._run("kubectl", (*base, *args), check=check, input=input, timeout=timeout)

    def helm(self, *args: Any, check: bool = True, input: str | None = None,
             timeout: float | None = 300) -> subprocess.CompletedProcess:
        """Run the built helm against this cluster, with its config and cache kept in the state dir."""
        h = self.state_dir / "helm"
        env = {"KUBECONFIG": self.kubeconfig, "HELM_CONFIG_HOME": str(h / "config"),
               "HELM_CACHE_HOME": str(h / "cache"), "HELM_DATA_HOME": str(h / "data")}
        return self._run("helm", args, check=check, input=input, env=env, timeout=timeout)

    def create_token(self, service_account: str, namespace: str = "default", duration: str = "1h") -> str:
        """A token for a ServiceAccount via the TokenRequest API (`kubectl create token`)."""
        return self.kubectl("create", "token", service_account, "-n", namespace,
                            f"--duration={duration}").stdout.strip()

    def node_bound_token(self, service_account: str, namespace: str, node: str, duration: str = "1h") -> str:
        """A token bound to Node `node` (created first when missing; no kubelet backs it here): the
        API server names the node in the token's userInfo.extra, which is how the chart's admission
        policy tells one agent from another. Deleting the Node revokes the token."""
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}))
        return self.kubectl("create", "token", service_account, "-n", namespace, f"--duration={duration}",
                            "--bound-object-kind", "Node", "--bound-object-name", node).stdout.strip()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def default_state_dir() -> Path:
    return cache_root() / "cluster"
