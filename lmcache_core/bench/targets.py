"""What a bench drives: an OpenAI-compatible server over HTTP (streaming), or ``CachedModel``.

Each target answers one :class:`~lmcache_core.bench.workloads.Request` with an
:class:`Outcome`; TTFT is the time to the first streamed token (HTTP) or the
model's own first token (``CachedModel``). ``concurrent`` says whether several
threads may call it at once (a server batches them; ``CachedModel`` runs one).
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from .workloads import Request

logger = logging.getLogger(__name__)
HTTP_TIMEOUT_S = 300.0


@dataclass
class Outcome:
    ttft_s: float
    total_s: float
    output_tokens: int
    cached_tokens: int | None = None  # prompt tokens the engine did not compute (None: unknown)
    by_tier: dict[str, int] = field(default_factory=dict)


def stream_messages(resp: Any, where: str) -> Iterator[dict[str, Any]]:
    """The JSON messages of an OpenAI-style server-sent event stream, up to ``[DONE]``; a message
    carrying an error raises RuntimeError naming ``where``."""
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        msg = json.loads(data)
        if msg.get("error"):
            raise RuntimeError(f"{where}: {msg['error']}")
        yield msg


def cached_tokens(usage: dict[str, Any], default: int | None = None) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens`` (vLLM with --enable-prompt-tokens-details)."""
    details = usage.get("prompt_tokens_details") or {}
    return int(details["cached_tokens"]) if details.get("cached_tokens") is not None else default


class Target(Protocol):
    name: str
    concurrent: bool

    def generate(self, request: Request) -> Outcome: ...

    def info(self) -> dict[str, Any]: ...


class CachedModelTarget:
    """A transformers model behind ``CachedModel``; ``use_cache=False`` is the no-cache baseline."""

    concurrent = False

    def __init__(self, name: str, cached_model: Any, *, use_cache: bool = True) -> None:
        self.name = name
        self.model = cached_model
        self.use_cache = use_cache
        self._lock = threading.Lock()

    def generate(self, request: Request) -> Outcome:
        with self._lock:
            res = self.model.generate(list(request.tokens), max_new_tokens=request.max_tokens,
                                      use_cache=self.use_cache)
        return Outcome(res.ttft_s, res.total_s, len(res.tokens), res.hit_tokens, dict(res.by_tier))

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "transformers", "use_cache": self.use_cache}
        engine = getattr(self.model, "engine", None)
        if self.use_cache and engine is not None:
            out["tiers"] = list(engine.config.tiers)
            policy = getattr(engine, "policy", None)
            if policy is not None:
                out["load_policy"] = policy.stats()
        return out


class OpenAITarget:
    """``/v1/completions`` with ``stream: true`` and token-id prompts (vLLM, SGLang, any server that
    takes them). ``unique_salt`` gives every request its own ``cache_salt``, so a vLLM server's
    prefix cache (and any connector) never hits: the no-cache baseline on the same process."""

    concurrent = True

    def __init__(self, name: str, base_url: str, model: str, *, unique_salt: bool = False,
                 salt: str = "", extra_body: dict[str, Any] | None = None) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        u = urllib.parse.urlsplit(self.base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"server URL must be http(s)://host:port, got {base_url!r}")
        self._host, self._port, self._tls = u.hostname, u.port, u.scheme == "https"
        self._path = (u.path or "") + "/v1/completions"
        self.model = model
        self.unique_salt = unique_salt
        self.salt = salt
        self.extra_body = dict(extra_body or {})

    def _conn(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._tls else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=HTTP_TIMEOUT_S)

    def generate(self, request: Request) -> Outcome:
        body: dict[str, Any] = {
            "model": self.model, "prompt": list(request.tokens), "max_tokens": request.max_tokens,
            "temperature": 0.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}, **self.extra_body,
        }
        salt = uuid.uuid4().hex if self.unique_salt else self.salt
        if salt:
            body["cache_salt"] = salt
        conn = self._conn()
        t0 = time.perf_counter()
        ttft = None
        out_tokens = 0
        cached = None
        try:
            conn.request("POST", self._path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"{self.base_url} answered {resp.status}: {resp.read(500)!r}")
            for msg in stream_messages(resp, self.base_url):
                if msg.get("choices"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    out_tokens += 1
                usage = msg.get("usage")
                if usage:
                    out_tokens = int(usage.get("completion_tokens") or out_tokens)
                    cached = cached_tokens(usage, cached)
        finally:
            conn.close()
        total = time.perf_counter() - t0
        if ttft is None:
            raise RuntimeError(f"{self.base_url} streamed no token for {request.id}")
        return Outcome(ttft, total, out_tokens, cached)

    def info(self) -> dict[str, Any]:
        return {"kind": "openai", "url": self.base_url, "model": self.model, "unique_salt": self.unique_salt}
