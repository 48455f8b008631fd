"""The configurations a bench compares, and the engines behind them.

vLLM (``vllm serve``, or ``vllm.LLM`` in a worker: :mod:`.llm_api`; one engine per group of
configurations that can share it):

- ``none``: no external cache; the server runs with its prefix cache, but every request
  carries its own ``cache_salt``, so nothing is ever reused (same process as ``prefix``);
- ``prefix``: the engine's own prefix cache only;
- ``lmcache``: lmcache-core embedded through ``LMCacheCoreConnector`` (prefix cache on);
- ``lmcache-daemon``: the same connector with ``daemon: <socket>`` (an ``lmcache serve``);
- ``upstream``: upstream LMCache through vLLM's in-tree ``LMCacheConnectorV1`` (its CPU
  backend), where ``import lmcache`` works in the server's interpreter.

transformers (``CachedModel``): ``none`` (``use_cache=False``), ``lmcache``,
``lmcache-adaptive`` (``load_policy: adaptive``), ``lmcache-daemon``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
SERVER_START_S = 300.0
VLLM_CONFIGS = ("none", "prefix", "lmcache", "lmcache-daemon", "upstream")
HF_CONFIGS = ("none", "lmcache", "lmcache-adaptive", "lmcache-daemon")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def python_with(module: str, explicit: str | None = None) -> str | None:
    """An interpreter that imports ``module`` and lmcache_core: ``explicit``, this one, ``.venv-vllm``."""
    cands = [explicit] if explicit else [os.environ.get("LMCACHE_VLLM_PYTHON"), sys.executable,
                                         str(ROOT / ".venv-vllm" / "bin" / "python")]
    for py in cands:
        if py and Path(py).exists():
            proc = subprocess.run([py, "-c", f"import {module}, lmcache_core"], capture_output=True, timeout=180)
            if proc.returncode == 0:
                return py
    return None


def file_tail(path: Path, n: int = 30) -> str:
    """The last ``n`` lines of a log file ("" when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class VLLMServer:
    """``vllm serve`` of a local model directory on a free port; ``connector`` is the
    ``kv_transfer_config`` (None: no connector)."""

    def __init__(self, python: str, model: str, *, connector: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, max_model_len: int = 4096, log_dir: Path | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.python, self.model, self.connector = python, model, connector
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                    **(env or {})}
        self.max_model_len = max_model_len
        self.extra_args = extra_args
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix="lmcache-bench-"))
        self.log_path = log_dir / f"vllm-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    def argv(self) -> list[str]:
        args = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", "bench",
                "--dtype", "float32", "--max-model-len", str(self.max_model_len), "--enforce-eager",
                "--skip-tokenizer-init", "--enable-prefix-caching", "--enable-prompt-tokens-details",
                "--seed", "0", *self.extra_args]
        if self.connector is not None:
            args += ["--kv-transfer-config", json.dumps(self.connector)]
        return args

    def log_tail(self, n: int = 30) -> str:
        return file_tail(self.log_path, n)

    def start(self) -> "VLLMServer":
        t0 = time.monotonic()
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log.close()
        deadline = t0 + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} before it was ready; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.monotonic() - t0
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"vllm serve not ready after {SERVER_START_S:.0f} s; log {self.log_path}:\n"
                           f"{self.log_tail()}")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def lmcache_connector(extra: dict[str, Any]) -> dict[str, Any]:
    return {"kv_connector": "LMCacheCoreConnector", "kv_connector_module_path": "lmcache_core.integrations.vllm",
            "kv_role": "kv_both", "kv_connector_extra_config": extra}


def upstream_connector() -> tuple[dict[str, Any], dict[str, str]]:
    """vLLM's in-tree ``LMCacheConnectorV1`` with upstream LMCache's local CPU backend (env config)."""
    env = {"LMCACHE_CHUNK_SIZE": "256", "LMCACHE_LOCAL_CPU": "True", "LMCACHE_MAX_LOCAL_CPU_SIZE": "2",
           "LMCACHE_USE_EXPERIMENTAL": "True"}
    return {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}, env


def server_groups(configs: list[str]) -> list[tuple[str, list[str]]]:
    """Configurations that share one server process: ``none`` and ``prefix`` differ only per request."""
    groups: list[tuple[str, list[str]]] = []
    plain = [c for c in configs if c in ("none", "prefix")]
    if plain:
        groups.append(("plain", plain))
    for c in configs:
        if c not in ("none", "prefix"):
            groups.append((c, [c]))
    return groups


def start_daemon(tiers: list[str], chunk_size: int, workdir: Path) -> Any:
    """An ``lmcache serve`` on a socket under ``workdir`` with these tiers (stop() it when done)."""
    from ..testing.daemon import DaemonProcess

    return DaemonProcess(workdir / f"daemon-{free_port()}", tiers=tiers, config={"chunk_size": chunk_size},
                         http=False).start()


def upstream_findings(log_path: Path) -> str:
    """What upstream LMCache said about its hits and lookups in a server log (its own log lines)."""
    import re

    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    hits = [int(m) for m in re.findall(r"LMCache hit tokens: (\d+)", text)]
    timeouts = text.count("Timeout occurred")
    return (f"LMCacheConnectorV1 ran; its log shows {len(hits)} lookups with {sum(hits)} LMCache hit tokens "
            f"and {timeouts} lookup RPC timeouts (log {log_path})")
