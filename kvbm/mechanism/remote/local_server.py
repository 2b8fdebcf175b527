"""Local redis-server processes for tests and benchmarks (Debian's redis-server; nothing persisted).

Operations:
  free_port()                          a free loopback TCP port
  RedisServer(port, *args).start()     redis-server on 127.0.0.1:port with --save '' --appendonly no
  .stop() / .kill() / .url             stop (SIGTERM), kill (SIGKILL), redis://127.0.0.1:port/0
  local_cluster(n, tmp)                n servers with cluster-enabled, joined by `redis-cli --cluster create`
  self_signed(tmp)                     (cert, key) for a TLS server: RedisServer(..., tls=(cert, key)), rediss://
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path


def free_port(below: int = 65536) -> int:
    """A loopback port nothing listens on now, under `below` (a cluster node also needs port + 10000)."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < below:
            return port
    with socket.socket() as s:  # ephemeral range entirely above `below`: try a fixed band
        for port in range(20000, below):
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free loopback port")


def available() -> bool:
    """Whether redis-server and redis-cli are on PATH."""
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


class RedisServer:
    """One redis-server on a loopback port, in its own scratch directory."""

    def __init__(self, port: int | None = None, *args: str, workdir: Path | None = None, password: str | None = None,
                 tls: tuple[Path, Path] | None = None):
        self.port = port or free_port()
        self.args = list(args)
        self.password = password
        self.tls = tls  # (certificate, key): serve TLS only, on `port`
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kvbm-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[0]}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        port = ["--port", str(self.port)]
        if self.tls:
            port = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls[0]),
                    "--tls-key-file", str(self.tls[1]), "--tls-ca-cert-file", str(self.tls[0]),
                    "--tls-auth-clients", "no"]
        cmd = ["redis-server", *port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.workdir), "--enable-debug-command", "local", *self.args]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as raw:
                    s = raw
                    if self.tls:
                        ctx = ssl.create_default_context(cafile=str(self.tls[0]))
                        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                    if reply.startswith((b"+PONG", b"-NOAUTH")):
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not start in {timeout} s")

    def cli(self, *args: str, check: bool = True) -> str:
        """Run redis-cli against this server; its stdout."""
        auth = ["--no-auth-warning", "-a", self.password] if self.password else []
        res = subprocess.run(["redis-cli", "-p", str(self.port), *auth, *args], capture_output=True, text=True,
                             timeout=30)
        if check and res.returncode:
            raise RuntimeError(f"redis-cli {' '.join(args)}: {res.stderr.strip()}")
        return res.stdout.strip()

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "RedisServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.kill()


def self_signed(workdir: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, made with the openssl command."""
    cert, key = Path(workdir) / "redis.crt", Path(workdir) / "redis.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def local_cluster(n: int = 3, workdir: Path | None = None) -> list[RedisServer]:
    """n cluster-enabled servers (no replicas) joined into one Redis Cluster covering all 16384 slots."""
    base = Path(workdir or tempfile.mkdtemp(prefix="kvbm-redis-cluster-"))
    servers = []
    try:
        for i in range(n):
            d = base / f"node{i}"
            d.mkdir(parents=True, exist_ok=True)
            port = free_port(below=65536 - 10000)  # the cluster bus listens on port + 10000
            servers.append(RedisServer(port, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                       "--cluster-node-timeout", "2000", workdir=d).start())
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{s.port}" for s in servers],
                       "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in s.cli("cluster", "info") for s in servers):
                return servers
            time.sleep(0.1)
        raise RuntimeError("the local Redis Cluster did not reach cluster_state:ok in 20 s")
    except BaseException:
        for s in servers:
            s.kill()
        raise


def stop_all(servers) -> None:
    for s in servers:
        s.kill()

