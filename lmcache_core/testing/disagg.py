"""Disaggregated prefill on one host, for the tests and ``benchmarks/disagg.py``.

Two ``lmcache serve`` daemons (A for the prefill instance, B for the decode instance),
each with a memory tier and a ``p2p://`` tier sharing one Redis directory; a ``vllm
serve`` per role (``kv_producer`` on A, ``kv_consumer`` on B); and the
:class:`~lmcache_core.integrations.vllm.proxy.DisaggProxy` in front. A request through
the proxy is prefilled on P, its chunks go into A's arena and A announces them; D's
lookup finds them through the directory and B reads them from A.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bench.engines import VLLMServer, free_port, lmcache_connector
from ..bench.targets import cached_tokens, stream_messages
from ..integrations.vllm.proxy import DisaggProxy
from .daemon import DaemonProcess


@dataclass
class Completion:
    """One streamed completion: the first token's time, the greedy tokens, what the engine reused."""

    ttft_s: float
    total_s: float
    tokens: list[int]
    cached_tokens: int | None
    headers: dict[str, str] = field(default_factory=dict)


def complete(url: str, prompt: list[int], max_tokens: int, *, salt: str = "", model: str = "bench",
             timeout: float = 300.0, extra: dict[str, Any] | None = None) -> Completion:
    """A greedy streamed ``/v1/completions`` of token ids, with the generated token ids."""
    u = urllib.parse.urlsplit(url)
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                            "return_token_ids": True, **(extra or {})}
    if salt:
        body["cache_salt"] = salt
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    t0 = time.perf_counter()
    ttft = None
    tokens: list[int] = []
    cached = None
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {resp.read(800)!r}")
        headers = {k.lower(): v for k, v in resp.getheaders()}
        for msg in stream_messages(resp, url):
            for choice in msg.get("choices") or ():
                if ttft is None:
                    ttft = time.perf_counter() - t0
                tokens.extend(int(t) for t in choice.get("token_ids") or ())
            if msg.get("usage"):
                cached = cached_tokens(msg["usage"], cached)
    finally:
        conn.close()
    if ttft is None:
        raise RuntimeError(f"{url} streamed no token")
    return Completion(ttft, time.perf_counter() - t0, tokens, cached, headers)


def daemon_metric(daemon: DaemonProcess, name: str, **labels: str) -> float:
    """A sample of the daemon's Prometheus ``/metrics`` (0 when absent)."""
    return metric(daemon.admin_url, name, **labels)


def metric(base_url: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus counter's samples at ``base_url/metrics`` with these labels (0 when
    absent); e.g. a vLLM server's ``vllm:external_prefix_cache_hits_total``."""
    text = urllib.request.urlopen(base_url + "/metrics", timeout=10).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = line[len(name) + 1 : line.index("}")]
        if all(part in got.split(",") for part in want.split(",") if part):
            total += float(line.rsplit(" ", 1)[1])
    return total


class DisaggCluster:
    """Prefill and decode vLLM servers, their daemons and the proxy (``with`` it, or start/close)."""

    def __init__(self, python: str, model: Path, workdir: Path, directory: str, *, chunk_size: int = 256,
                 max_model_len: int = 4096, wait_ms: int = 2000, memory: str = "256MiB",
                 transport: str = "tcp") -> None:
        self.python, self.model, self.workdir = python, model, Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        token = self.workdir / "cluster.token"
        token.write_text("lmcache-disagg-cluster-token-0123456789\n")
        self.daemons: dict[str, DaemonProcess] = {}
        for role in ("prefill", "decode"):
            port = free_port()
            p2p = (f"p2p://127.0.0.1:{port}?directory={directory}&token_file={token}&transport={transport}"
                   f"&advertise=127.0.0.1:{port}")
            self.daemons[role] = DaemonProcess(self.workdir / f"daemon-{role}",
                                               tiers=[f"memory://?capacity={memory}", p2p],
                                               config={"chunk_size": chunk_size})
        self.servers: dict[str, VLLMServer] = {}
        for role, kv_role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
            extra: dict[str, Any] = {"daemon": self.daemons[role].url, "chunk_size": chunk_size}
            if role == "decode":
                extra["remote_prefill_wait_ms"] = wait_ms
            connector = dict(lmcache_connector(extra), kv_role=kv_role)
            self.servers[role] = VLLMServer(python, str(model), connector=connector, log_dir=self.workdir,
                                            max_model_len=max_model_len)
        self.proxy: DisaggProxy | None = None

    def start(self) -> "DisaggCluster":
        try:
            for d in self.daemons.values():
                d.start()
            errors: list[BaseException] = []

            def up(server: VLLMServer) -> None:
                try:
                    server.start()
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=up, args=(s,)) for s in self.servers.values()]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            self.proxy = DisaggProxy([self.servers["prefill"].url], [self.servers["decode"].url]).start()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def url(self) -> str:
        assert self.proxy is not None, "start() the cluster first"
        return self.proxy.url

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None
        for s in self.servers.values():
            s.close()
        for d in self.daemons.values():
            d.stop()

    def __enter__(self) -> "DisaggCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
