"""What the vLLM connector's scheduler and worker halves share: options, the step plan, engines.

Nothing here imports vLLM: the plan travels from the scheduler process to the
workers inside vLLM's connector metadata (pickled), and the GPU benchmark
drives the worker half with plans it builds itself.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

from ...config import Config
from ...engine import CacheEngine
from ...errors import ConfigError
from ...keys import ChunkKey, KeyExtras
from ...layout import ChunkGeometry

logger = logging.getLogger(__name__)

ASYNC_LOAD_CHOICES = ("auto", "true", "false")
LOAD_FAILURE_CHOICES = ("recompute", "fail")
# Tiers whose lookups are local (memory, files): answered on the scheduler's step. Any other
# tier (Redis, S3, plugins) is looked up off the step and the request waits for the answer.
LOCAL_SCHEMES = frozenset({"memory", "disk", "file"})


@dataclass(frozen=True)
class ConnectorOptions:
    """Connector-only settings, read from ``kv_connector_extra_config`` next to the
    :class:`~lmcache_core.config.Config` keys (which configure the cache itself)."""

    # auto: load asynchronously (the request waits, the batch runs on) when a hit
    # chunk lives outside the fastest tier; true/false force one way.
    async_load: str = "auto"
    # Keep gathering a step's stores off the engine's step: report them through
    # get_finished and let vLLM delay freeing the request's blocks until then.
    async_save: bool = True
    # What a chunk that cannot be loaded costs: "recompute" (the connector sets vLLM's
    # kv_load_failure_policy so; the request is slower, never failed) or "fail" (vLLM fails
    # the request; only when asked for here explicitly).
    load_failure_policy: str = "recompute"
    # auto: look requests up off the scheduler's step when a tier is remote (Redis, S3, ...);
    # true/false force one way.
    async_lookup: str = "auto"
    # Disaggregated prefill, consumer side: how long a request whose kv_transfer_params
    # say a prefill instance stored N prompt tokens waits for those chunks to be found
    # (the producer's stores finish after its response); then it loads what is there and
    # computes the rest.
    remote_prefill_wait_ms: int = 2000

    @classmethod
    def split(cls, extra: Mapping[str, Any] | None) -> tuple["ConnectorOptions", dict[str, Any]]:
        """Separate connector options from cache config keys; validate the former."""
        own = {f.name for f in fields(cls)}
        options: dict[str, Any] = {}
        rest: dict[str, Any] = {}
        for key, value in (extra or {}).items():
            name = key.replace("-", "_").lower()
            (options if name in own else rest)[name if name in own else key] = value
        async_load = str(options.get("async_load", "auto")).lower()
        if async_load not in ASYNC_LOAD_CHOICES:
            raise ConfigError(
                f"async_load: {options['async_load']!r} is not allowed; choose one of {', '.join(ASYNC_LOAD_CHOICES)}"
            )
        failure = str(options.get("load_failure_policy", "recompute")).lower()
        if failure not in LOAD_FAILURE_CHOICES:
            raise ConfigError(f"load_failure_policy: {options['load_failure_policy']!r} is not allowed; choose one "
                              f"of {', '.join(LOAD_FAILURE_CHOICES)}")
        async_lookup = str(options.get("async_lookup", "auto")).lower()
        if async_lookup not in ASYNC_LOAD_CHOICES:
            raise ConfigError(f"async_lookup: {options['async_lookup']!r} is not allowed; choose one of "
                              f"{', '.join(ASYNC_LOAD_CHOICES)}")
        async_save = options.get("async_save", True)
        if isinstance(async_save, str):
            if async_save.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ConfigError(f"async_save: expected true or false, got {async_save!r}")
            async_save = async_save.lower() in ("true", "1", "yes", "on")
        wait = options.get("remote_prefill_wait_ms", 2000)
        try:
            wait = int(wait)
            if wait < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"remote_prefill_wait_ms: expected milliseconds >= 0, got {wait!r}") from None
        return cls(async_load=async_load, async_save=bool(async_save), load_failure_policy=failure,
                   async_lookup=async_lookup, remote_prefill_wait_ms=wait), rest


def load_config(extra: Mapping[str, Any] | None) -> tuple[ConnectorOptions, Config]:
    """Options and cache config from ``kv_connector_extra_config`` (plus the YAML file and
    ``LMCACHE_*`` environment, as everywhere else). Unknown keys are an error naming both sets."""
    options, rest = ConnectorOptions.split(extra)
    try:
        config = Config.load(overrides=rest)
    except ConfigError as exc:
        own = ", ".join(f.name for f in fields(ConnectorOptions))
        raise ConfigError(f"kv_connector_extra_config: {exc} (connector options: {own})") from exc
    return options, config


# -- the plan of one engine step, scheduler -> workers -----------------------------------------------
@dataclass(frozen=True)
class LoadSpec:
    """Load the cached prefix ``[start, end)`` of a request into its blocks.

    ``token_ids`` are the prompt the scheduler looked up (chunk keys depend on
    every token of a chunk, so a partial last chunk is only found under the
    full prompt); ``end`` caps the load. Tokens before ``start`` are already in
    vLLM's own cache and are not written (their slots point at the null block).
    """

    req_id: str
    token_ids: tuple[int, ...]
    block_ids: tuple[int, ...]
    start: int
    end: int
    is_async: bool = False
    extras: KeyExtras | None = None

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SaveSpec:
    """Store the chunks of a request's first ``end`` tokens from ``start`` on (chunks before
    ``start`` were stored in an earlier step; their blocks may be gone by now)."""

    req_id: str
    token_ids: tuple[int, ...]
    block_ids: tuple[int, ...]
    extras: KeyExtras | None = None
    start: int = 0

    @property
    def end(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class StepPlan:
    loads: tuple[LoadSpec, ...] = ()
    saves: tuple[SaveSpec, ...] = ()
    preempted: tuple[str, ...] = ()
    null_block: int = 0  # vLLM's never-allocated block; a sink for slots that must not be written


# -- the workers' memory tiers, as the scheduler sees them ------------------------------------------
class PresenceMirror:
    """Which chunks the workers hold in their memory tiers, kept by the scheduler from the
    journal each worker sends back with every step (vLLM's worker -> scheduler connector
    metadata). It lets a memory-only configuration serve hits when vLLM runs the workers in
    other processes. A stale entry costs a short load (blocks recomputed), never wrong KV:
    the worker loads from its own tiers and verifies every chunk."""

    def __init__(self) -> None:
        self._keys: dict[bytes, set[bytes]] = {}  # namespace id -> chunk digests
        self._lock = threading.Lock()

    def apply(self, added: Sequence[bytes], removed: Sequence[bytes], reset: Sequence[bytes] = ()) -> None:
        with self._lock:
            for ns in reset:
                self._keys.pop(ns, None)
            for k in removed:
                got = self._keys.get(k[:16])
                if got is not None:
                    got.discard(k[16:])
            for k in added:
                self._keys.setdefault(k[:16], set()).add(k[16:])

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [key.digest in self._keys.get(key.namespace, ()) for key in keys]

    def __len__(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._keys.values())


# -- engines shared within a process ---------------------------------------------------------------
@dataclass
class _Shared:
    engine: CacheEngine
    users: int = 0


_ENGINES: dict[tuple[Any, ...], _Shared] = {}
_ENGINES_LOCK = threading.Lock()


@dataclass(frozen=True)
class EngineHandle:
    """A reference to a process-wide engine; ``close()`` drops it (the last one closes the engine)."""

    key: tuple[Any, ...]
    engine: CacheEngine = field(compare=False)

    def close(self) -> None:
        with _ENGINES_LOCK:
            shared = _ENGINES.get(self.key)
            if shared is None:
                return
            shared.users -= 1
            if shared.users > 0:
                return
            del _ENGINES[self.key]
        shared.engine.close()


def shared_engine(geometry: ChunkGeometry, config: Config, model: str, *, shard: str = "",
                  device_index: int = 0) -> EngineHandle:
    """One engine per (geometry, config, model, shard) per process.

    When vLLM runs the scheduler and the worker in one process (one GPU: the
    uni-process executor), both halves share this engine and so its memory
    tier; in separate processes (TP/PP > 1, or the multiprocessing executor)
    the scheduler's lookups see the shared tiers (disk, Redis) only. The
    metrics port is not part of the key: the scheduler never serves metrics,
    and the worker that shares its engine serves them.
    """
    cfg = tuple(sorted((k, repr(v)) for k, v in config.to_dict().items() if k != "metrics_port"))
    secret = config.integrity_secret()  # redacted in to_dict(): key engines by a digest of it
    key = (geometry, cfg, model, shard, hashlib.sha256(secret).hexdigest() if secret else "")
    with _ENGINES_LOCK:
        shared = _ENGINES.get(key)
        if shared is None:
            shared = _ENGINES[key] = _Shared(CacheEngine(geometry, config, model=model, shard=shard,
                                                         device_index=device_index))
        elif config.metrics_port:  # the worker joining the scheduler's engine (one process) serves them
            shared.engine.serve_metrics(config.metrics_port)
        shared.users += 1
        return EngineHandle(key, shared.engine)


def note_without_shared_tier(engine: CacheEngine) -> bool:
    """Say once at startup where hits can come from when no tier outlives the process."""
    if any(t.store.capabilities.shared for t in engine.tiers.tiers):
        return True
    logger.info(
        "lmcache-core: no shared tier in %s: hits come from the workers' memory tiers (the scheduler "
        "follows them through vLLM's worker metadata) and end with the process; add a disk:// or "
        "redis:// tier to keep KV across restarts and instances",
        [t.name for t in engine.tiers.tiers],
    )
    return False
