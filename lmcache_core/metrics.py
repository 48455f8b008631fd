"""Prometheus metrics of one engine (lookups, hits by tier, bytes, errors, evictions, drops)."""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

logger = logging.getLogger(__name__)


class Metrics:
    """Counters for one engine, in their own registry (several engines may share a process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.lookups = Counter("lmcache_lookups", "Lookups", registry=r)
        self.lookup_tokens = Counter("lmcache_lookup_tokens", "Tokens asked for in lookups", registry=r)
        self.hit_tokens = Counter("lmcache_hit_tokens", "Tokens found, by the tier that served them",
                                  ["tier"], registry=r)
        self.stored_tokens = Counter("lmcache_stored_tokens", "Tokens stored", registry=r)
        self.bytes = Counter("lmcache_bytes", "Bytes moved, by tier and direction (read/write)",
                             ["tier", "direction"], registry=r)
        self.errors = Counter("lmcache_errors", "Failed operations, by tier and operation",
                              ["tier", "op"], registry=r)
        self.corrupt = Counter("lmcache_corrupt_chunks", "Chunks that failed verification", ["tier"],
                               registry=r)
        self.evictions = Counter("lmcache_evictions", "Chunks evicted", ["tier"], registry=r)
        self.skipped_writes = Counter("lmcache_skipped_writes",
                                      "Puts of a chunk the tier already held (not written again)", ["tier"],
                                      registry=r)
        self.dropped = Counter("lmcache_dropped_stores",
                               "Stores a tier did not take: queue full, backing off, refused by the server",
                               ["tier"], registry=r)
        self.healthy = Gauge("lmcache_tier_healthy", "1 when a tier is in use, 0 while it backs off",
                             ["tier"], registry=r)
        self.queued = Gauge("lmcache_store_queue", "Writes queued per tier", ["tier"], registry=r)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a counter sample (tests and the CLI)."""
        for suffix in ("_total", ""):
            v = self.registry.get_sample_value(name + suffix, labels)
            if v is not None:
                return v
        return 0.0

    def snapshot(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name.endswith("_created"):
                    continue
                label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{label}}}" if label else s.name] = s.value
        return out


_served: set[int] = set()
_lock = threading.Lock()


def serve(metrics: Metrics, port: int) -> None:
    """Expose ``metrics`` on http://0.0.0.0:port/metrics (once per port)."""
    with _lock:
        if port in _served:
            return
        start_http_server(port, registry=metrics.registry)
        _served.add(port)
        logger.info("Prometheus metrics on port %d", port)
