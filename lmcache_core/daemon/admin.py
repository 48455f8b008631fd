"""The daemon's admin API over HTTP (stdlib ``http.server``; 127.0.0.1 by default).

GET ``/health``, ``/metrics`` (Prometheus), ``/stats`` (JSON), ``/trace?tenant=T&key=HEX``;
POST ``/invalidate``, ``/pin``, ``/unpin``, ``/evict``, ``/ttl`` with a JSON body. Every POST
needs ``Authorization: Bearer <token>``: the admin token acts on any tenant, a tenant's own
token only on that tenant (a request naming another tenant is refused and audited).
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..keys import ChunkKey
from .settings import split_hostport

if TYPE_CHECKING:
    from .server import Daemon, Tenant

logger = logging.getLogger(__name__)
MAX_BODY = 1 << 20


class _TenantCollector:
    """Every tenant's tier-stack metrics with a ``tenant`` label, plus the daemon's own."""

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon

    def collect(self) -> Any:
        merged: dict[str, Metric] = {}
        for name, tenant in self.daemon.tenants.items():
            for family in tenant.metrics.registry.collect():
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type)
                for s in family.samples:
                    out.add_sample(s.name, {**s.labels, "tenant": name}, s.value, s.timestamp)
        yield from merged.values()
        stats = self.daemon.stats()
        g = GaugeMetricFamily("lmcache_daemon_arena_used_bytes", "Arena bytes in use", labels=["tenant"])
        s = GaugeMetricFamily("lmcache_daemon_sessions", "Connected clients", labels=["tenant"])
        for name, t in stats["tenants"].items():
            g.add_metric([name], t["arena_used"])
            s.add_metric([name], t["sessions"])
        yield g
        yield s
        r = CounterMetricFamily("lmcache_daemon_refused", "Requests refused, by reason", labels=["reason"])
        for reason, n in stats["refused"].items():
            r.add_metric([reason], n)
        yield r
        yield from self.daemon.latency_families()
        yield from self.daemon.registry.collect()


class AdminServer:
    def __init__(self, daemon: "Daemon", address: str) -> None:
        self.daemon = daemon
        host, port = split_hostport(address)
        self.registry = CollectorRegistry()
        self.registry.register(_TenantCollector(daemon))  # type: ignore[arg-type]
        handler = type("Handler", (_Handler,), {"admin": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> "AdminServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="lmcache-admin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- authorisation ---------------------------------------------------------------------
    def principal(self, token: str) -> tuple[str, str | None] | None:
        """("admin", None) or ("tenant", name) for a valid token, None otherwise."""
        if self.daemon.settings.is_admin(token):
            return "admin", None
        ts = self.daemon.settings.tenant_for_token(token) if token else None
        if ts is not None and ts.token_sha256:
            return "tenant", ts.name
        return None  # any local user reaches 127.0.0.1: without a configured token nothing changes


class _Handler(BaseHTTPRequestHandler):
    admin: AdminServer
    server_version = "lmcache-admin"

    def log_message(self, fmt: str, *args: Any) -> None:
        logger.debug("admin %s: " + fmt, self.client_address[0], *args)

    def _send(self, code: int, body: Any, ctype: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else (json.dumps(body, indent=1, default=str) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        d = self.admin.daemon
        if url.path == "/health":
            self._send(200, {"status": "ok", "protocol": d.stats()["protocol"], "sessions": len(d.sessions),
                             "tenants": sorted(d.tenants)})
        elif url.path == "/metrics":
            self._send(200, generate_latest(self.admin.registry), "text/plain; version=0.0.4")
        elif url.path == "/stats":
            self._send(200, d.stats())
        elif url.path == "/trace":
            q = parse_qs(url.query)
            tenant = d.tenants.get((q.get("tenant") or ["default"])[0])
            try:
                key = ChunkKey.from_bytes(bytes.fromhex((q.get("key") or [""])[0].replace("/", "")))
            except ValueError as exc:
                self._send(400, {"error": f"key: {exc}; pass the chunk key as 64 hex digits"})
                return
            if tenant is None:
                self._send(404, {"error": "no such tenant"})
                return
            self._send(200, d.trace(tenant, key))
        else:
            self._send(404, {"error": f"no such endpoint {url.path}; try /health, /metrics, /stats"})

    def do_POST(self) -> None:  # noqa: N802
        d = self.admin.daemon
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        who = self.admin.principal(token)
        path = urlsplit(self.path).path
        peer = f"http:{self.client_address[0]}"
        if who is None:
            d.audit("unauthenticated", path, "refused", peer=peer, reason="no valid token")
            self._send(401, {"error": "a valid admin or tenant token is needed: Authorization: Bearer <token> "
                                      "(configure serve.admin_token_sha256: `lmcache serve --hash-token TOKEN`)"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 <= length <= MAX_BODY:
                raise ValueError(f"body of {length} bytes")
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as exc:
            self._send(400, {"error": f"bad request body: {exc}"})
            return
        kind, own = who
        name = body.get("tenant", own or "default")
        label = "admin" if kind == "admin" else f"tenant:{own}"
        if kind == "tenant" and name != own:
            d.audit(label, path, "refused", peer=peer, tenant=name, reason="a tenant token acts only on its tenant")
            self._send(403, {"error": f"this token belongs to tenant {own!r}; it cannot act on {name!r}"})
            return
        tenant = d.tenants.get(name)
        if tenant is None:
            self._send(404, {"error": f"no tenant {name!r}; tenants: {sorted(d.tenants)}"})
            return
        try:
            result = self._action(path, tenant, body)
        except (KeyError, TypeError, ValueError) as exc:
            self._send(400, {"error": f"{path}: {exc}"})
            return
        if result is None:
            self._send(404, {"error": f"no such action {path}; POST /invalidate, /pin, /unpin, /evict or /ttl"})
            return
        d.audit(label, path, "ok", peer=peer, tenant=name,
                **{k: v for k, v in body.items() if k in ("model", "seconds", "memory_only")})
        self._send(200, result)

    def _action(self, path: str, tenant: "Tenant", body: dict[str, Any]) -> dict[str, Any] | None:
        d = self.admin.daemon
        model = body.get("model")
        tokens = body.get("tokens")
        if tokens is not None and (not isinstance(tokens, list) or not all(type(t) is int for t in tokens)):
            raise ValueError("tokens must be a list of integers")
        if path == "/invalidate":
            if tokens:
                keys = d.prefix_keys(tenant, tokens, model)
                return {"deleted": tenant.tiers.delete(keys), "keys": len(keys)}
            spaces = [ns.id for ns in d.namespaces_of(tenant, model)]
            if model is None and not spaces:
                spaces = []
            d.clear_namespaces(tenant, spaces)
            return {"cleared_namespaces": len(spaces)}
        if path in ("/pin", "/unpin"):
            if not tokens:
                raise ValueError("pass tokens: the prefix to pin")
            keys = d.prefix_keys(tenant, tokens, model)
            with tenant.lock:
                if path == "/pin":
                    tenant.admin_pins.update(keys)
                    tenant.tiers.pin(keys)
                else:
                    mine = [k for k in keys if tenant.admin_pins.get(k, 0) > 0]
                    tenant.admin_pins.subtract(mine)
                    tenant.tiers.unpin(mine)
            return {"keys": len(keys)}
        if path == "/evict":
            spaces = [ns.id for ns in d.namespaces_of(tenant, model)]
            d.clear_namespaces(tenant, spaces, memory_only=True)
            return {"evicted_namespaces": len(spaces)}
        if path == "/ttl":
            seconds = body["seconds"]
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
                raise ValueError("seconds must be a number >= 0 (0: no expiry)")
            tenant.ttl_s = float(seconds)
            return {"ttl_s": tenant.ttl_s}
        return None
