"""A real ``lmcache serve`` process for tests: start, wait for its socket, kill, restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml


class DaemonProcess:
    def __init__(self, workdir: Path, *, tiers: list[str] | None = None, serve: dict[str, Any] | None = None,
                 config: dict[str, Any] | None = None, http: bool = True) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket = str(self.workdir / "lmcache.sock")
        self.http_port = _free_port() if http else 0
        section = {"socket": self.socket, "lease_s": 10, **(serve or {})}
        if http:
            section["http"] = f"127.0.0.1:{self.http_port}"
        doc = {"tiers": tiers or ["memory://?capacity=64MiB"], "chunk_size": 32, **(config or {}), "serve": section}
        self.config_file = self.workdir / "daemon.yaml"
        self.config_file.write_text(yaml.safe_dump(doc))
        self.log = self.workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"daemon://{self.socket}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> "DaemonProcess":
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lmcache_core.cli", "serve", "--config", str(self.config_file),
                 "--log-level", "INFO"], stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lmcache serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if os.path.exists(self.socket) and (not self.http_port or _port_open(self.http_port)):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"lmcache serve did not come up in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(pred: Any, timeout: float = 15.0, step: float = 0.1, what: str = "") -> Any:
    """Poll ``pred`` until it returns something true (returned); on timeout its last value, or
    with ``what`` an AssertionError naming what did not happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(step)
    if what:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")
    return pred()

