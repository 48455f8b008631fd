"""lmcache-core as a vLLM KV connector (KV connector V1 API; tested vLLM range in compat.py).

Enable it with one flag::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "LMCacheCoreConnector",
        "kv_connector_module_path": "lmcache_core.integrations.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"tiers": ["memory://?capacity=4GiB", "disk:///var/cache/lmcache"]}}'

``kv_connector_extra_config`` holds the same keys as every other lmcache-core
config (``chunk_size``, ``tiers``, ``model``, ...) plus the connector options
of :class:`~lmcache_core.integrations.vllm.common.ConnectorOptions`. vLLM
makes one SCHEDULER-role instance (in the engine-core process) and one
WORKER-role instance per worker. With one GPU both live in one engine-core
process and share one engine (its memory tier serves hits); with tensor or
pipeline parallelism each worker is its own process, and the scheduler half
looks chunks up in the tiers the workers write to, so at least one tier must
be shared between processes (disk, Redis). Each TP rank and PP stage keys its
own shard; the scheduler promises a chunk only when every shard holds it.
See docs/vllm.md.

Importing this module imports vLLM; ``import lmcache_core`` does not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch  # noqa: F401 - vLLM imports it anyway; keeps the import order torch-first
import vllm

from .compat import check_modules, check_startup

check_modules(vllm.__version__)  # before the imports below: a moved module is a clear refusal

from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: E402
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats  # noqa: E402
from vllm.v1.metrics.cache_hit_source import CacheHitSource  # noqa: E402

from ...errors import ConfigError, LayoutError
from ...keys import Namespace, model_fingerprint, named_model_fingerprint, shard_id
from .common import EngineHandle, StepPlan, load_config, note_without_shared_tier, shared_engine
from .layout import bind_vllm_caches, geometry_from_spec, stage_layers
from .scheduler import VLLMScheduler
from .worker import STAT_KEYS, VLLMWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

SCHEDULER_STAT_KEYS = ("lookup_requests", "lookup_tokens", "hit_tokens")
_TIER_SOURCES = {"memory": CacheHitSource.HOST, "cpu": CacheHitSource.HOST, "disk": CacheHitSource.DISK,
                 "file": CacheHitSource.DISK}


@dataclass
class LMCacheCoreMetadata(KVConnectorMetadata):
    """The scheduler's plan for one step, as vLLM ships it to the workers."""

    plan: StepPlan = field(default_factory=StepPlan)


@dataclass
class LMCacheCoreWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, every step: chunk keys the worker's memory tier gained and lost (and
    the namespaces whose journal overflowed and were sent whole), summed over workers."""

    added: list[bytes] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)
    reset: list[bytes] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> "LMCacheCoreWorkerMeta":
        if not isinstance(other, LMCacheCoreWorkerMeta):
            return self
        return LMCacheCoreWorkerMeta(self.added + other.added, self.removed + other.removed,
                                     self.reset + other.reset)


@dataclass
class LMCacheCoreStats(KVConnectorStats):
    """Counters of one interval, summed over workers and the scheduler; logged by vLLM as
    ``KV Transfer metrics: ...`` and exported as ``vllm:lmcache_core_*`` Prometheus counters."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "LMCacheCoreStats":
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: (round(v, 4) if isinstance(v, float) and not v.is_integer() else int(v))
                for k, v in sorted(self.data.items())}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class LMCacheCorePromMetrics(KVConnectorPromMetrics):
    """``vllm:lmcache_core_<stat>`` counters, one per stat key, per engine."""

    def __init__(self, vllm_config: "VllmConfig", metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters: dict[str, dict[int, Any]] = {}
        for key in STAT_KEYS + SCHEDULER_STAT_KEYS:
            metric = self._counter_cls(name=f"vllm:lmcache_core_{key}",
                                       documentation=f"lmcache-core connector: {key.replace('_', ' ')}",
                                       labelnames=labelnames)
            self.counters[key] = {idx: metric.labels(*values) for idx, values in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, value in transfer_stats_data.items():
            per_engine = self.counters.get(key)
            if per_engine is not None and value and engine_idx in per_engine:
                per_engine[engine_idx].inc(value)


def _ensure_log_handler() -> None:
    """vLLM configures only its own ``vllm`` logger: give ours a handler in its style, once per
    process, so that INFO lines (hits, loads) show up when ``log_level`` asks for them."""
    ours = logging.getLogger("lmcache_core")
    if ours.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [lmcache_core] %(message)s", "%m-%d %H:%M:%S"))
    ours.addHandler(handler)
    ours.propagate = False


# KV cache formats whose bytes we can key: the format name is in the model fingerprint; fp8
# scales come from the checkpoint (fingerprinted by path and revision) or default to 1.
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "half", "float", "float32", "fp8", "fp8_e4m3", "fp8_e5m2")


def vllm_model_fingerprint(vllm_config: "VllmConfig", name: str | None = None) -> str:
    """The model identity of a vLLM engine: path/name and revision, dtype, quantization, KV
    cache format and config overrides. Refuses KV formats it cannot key."""
    mc, cc = vllm_config.model_config, vllm_config.cache_config
    kv_dtype = str(getattr(cc, "cache_dtype", "auto") or "auto")
    if kv_dtype not in KV_CACHE_DTYPES:
        raise ConfigError(
            f"lmcache-core: kv_cache_dtype {kv_dtype!r} is not supported (its scales live outside the KV "
            f"blocks); use one of {', '.join(KV_CACHE_DTYPES)}"
        )
    if kv_dtype.startswith("fp8") and getattr(cc, "calculate_kv_scales", False):
        raise ConfigError(
            "lmcache-core: calculate_kv_scales=True computes fp8 KV scales from the first batch, so the "
            "same prompt can give different KV bytes in two engines and a cached chunk would be read with "
            "other scales; run without --calculate-kv-scales (the checkpoint's scales are keyed)"
        )
    quant = getattr(mc, "quantization", None)
    if name:  # named by the user: the engine-neutral identity the SGLang backend keys too
        return named_model_fingerprint(name, kv_cache_dtype=kv_dtype, quantization=quant)
    return model_fingerprint(
        name or str(mc.model), revision=getattr(mc, "revision", None), dtype=getattr(mc, "dtype", None),
        quantization=quant, kv_cache_dtype=kv_dtype,
        overrides={"hf_overrides": getattr(mc, "hf_overrides", None) or {},
                   "quantization_config": getattr(mc, "quantization_config", None) or {},
                   "kv_cache_dtype_skip_layers": list(getattr(cc, "kv_cache_dtype_skip_layers", []) or [])})


class LMCacheCoreConnector(KVConnectorBase_V1):
    """The vLLM KV connector backed by a :class:`~lmcache_core.engine.CacheEngine`.

    It does not declare ``SupportsHMA``: vLLM then runs hybrid models (sliding-window plus full
    attention) with one full KV cache group, every layer keeping every token, which we store
    and load like any other model."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig") -> None:
        check_startup(vllm.__version__, KVConnectorBase_V1, type(self))  # refuse an untested API change
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _ensure_log_handler()
        self.options, self.config = load_config(self._kv_transfer_config.kv_connector_extra_config)
        logging.getLogger("lmcache_core").setLevel(self.config.log_level)
        kv_role = self._kv_transfer_config.kv_role or "kv_both"
        self.can_load = kv_role in ("kv_both", "kv_consumer")
        self.can_save = kv_role in ("kv_both", "kv_producer")
        self.block_size = int(vllm_config.cache_config.block_size)
        self.config.check_block_size(self.block_size)
        self.model = vllm_model_fingerprint(vllm_config, self.config.model or None)
        self._spec, self._layer_names = self._attention_spec(kv_cache_config)
        window = getattr(self._spec, "sliding_window", None)
        if window and int(window) < self.config.chunk_size:
            # vLLM frees blocks behind the window while a request is prefilled; a chunk must
            # still be whole when it completes.
            raise ConfigError(
                f"lmcache-core: chunk_size {self.config.chunk_size} is larger than the model's sliding window "
                f"{window}; set chunk_size to at most {int(window) // self.block_size * self.block_size}"
            )
        self.use_mla = type(self._spec).__name__.startswith("MLA") or bool(
            getattr(vllm_config.model_config, "use_mla", False))
        par = vllm_config.parallel_config
        self.tp_size = int(getattr(par, "tensor_parallel_size", 1) or 1)
        self.pp_size = int(getattr(par, "pipeline_parallel_size", 1) or 1)
        self._num_hidden_layers = int(getattr(vllm_config.model_config.hf_text_config, "num_hidden_layers",
                                              len(self._layer_names)))
        # Stage 0's geometry; the worker recomputes its own stage's from its tensors.
        self.geometry = self._stage_geometry(0)
        self._null_block = 0
        self._handle: EngineHandle | None = None
        self._scheduler: VLLMScheduler | None = None
        self._worker: VLLMWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._set_load_failure_policy()
            # The scheduler never serves metrics; the worker does, on the configured port (also when
            # it shares this engine in one process).
            self._handle = shared_engine(self.geometry, self.config.replace(metrics_port=0), self.model,
                                         shard=self._shard(0, 0))
            engine = self._handle.engine
            engine.peer_namespaces = tuple(self._shard_namespace(engine.namespace, r, s)
                                           for s in range(self.pp_size) for r in range(self.tp_size)
                                           if (r, s) != (0, 0))
            note_without_shared_tier(engine)
            self._scheduler = VLLMScheduler(engine, self.block_size, self.options,
                                            can_load=self.can_load, can_save=self.can_save)
        where = f"daemon {self.config.daemon}" if self.config.daemon else f"tiers {list(self.config.tiers)}"
        codec = f", kv_codec {self.config.kv_codec}" if self.config.kv_codec not in ("", "none") else ""
        logger.info("lmcache-core connector (%s, %s): model %r, chunk layout %s, chunk_size %d, %s%s, tp %d, pp %d",
                    role.name, kv_role, self.model, self.geometry.signature, self.config.chunk_size, where, codec,
                    self.tp_size, self.pp_size)

    # -- identity: shards, stages, failure policy -----------------------------------------------
    def _stage_layers(self, stage: int) -> tuple[list[str], tuple[int, int]]:
        return stage_layers(self._layer_names, self._num_hidden_layers, stage, self.pp_size)

    def _stage_geometry(self, stage: int) -> Any:
        names, _ = self._stage_layers(stage)
        return geometry_from_spec(len(names), int(self._spec.num_kv_heads), int(self._spec.head_size),
                                  self._spec.dtype, self.use_mla)

    def _shard(self, tp_rank: int, stage: int) -> str:
        return shard_id(tp_rank, self.tp_size, stage, self.pp_size, self._stage_layers(stage)[1])

    def _shard_namespace(self, base: Namespace, tp_rank: int, stage: int) -> Namespace:
        return base.with_shard(self._shard(tp_rank, stage), self._stage_geometry(stage).signature)

    def _set_load_failure_policy(self) -> None:
        """A cache fault must cost time, never a request: unless the connector's own
        ``load_failure_policy`` says "fail", vLLM recomputes blocks that could not be loaded."""
        ktc = self._kv_transfer_config
        want = self.options.load_failure_policy
        have = getattr(ktc, "kv_load_failure_policy", want)
        if have != want:
            try:
                ktc.kv_load_failure_policy = want
            except Exception as exc:  # noqa: BLE001 - a frozen config: say what to set
                raise ConfigError(
                    f"lmcache-core: vLLM's kv_load_failure_policy is {have!r}; set it to {want!r} in "
                    f"--kv-transfer-config (or load_failure_policy in kv_connector_extra_config)"
                ) from exc
            if want == "recompute":
                logger.info("lmcache-core: kv_load_failure_policy set to 'recompute' (a chunk that fails to "
                            "load is recomputed; set load_failure_policy: fail in kv_connector_extra_config "
                            "to fail such requests instead)")

    @staticmethod
    def _attention_spec(kv_cache_config: "KVCacheConfig") -> tuple[Any, list[str]]:
        """The one attention KV cache group. Sliding-window layers arrive here as full-attention
        specs (we do not declare SupportsHMA, so vLLM keeps every token of every layer)."""
        groups = [g for g in kv_cache_config.kv_cache_groups if hasattr(g.kv_cache_spec, "num_kv_heads")]
        if len(kv_cache_config.kv_cache_groups) != 1 or len(groups) != 1:
            kinds = [type(g.kv_cache_spec).__name__ for g in kv_cache_config.kv_cache_groups]
            raise LayoutError(
                f"lmcache-core supports models whose layers share one KV cache group; this one has {kinds} "
                "(Mamba/SSM state is not stored yet)"
            )
        spec = groups[0].kv_cache_spec
        return spec, list(groups[0].layer_names)

    @property
    def requires_kv_delivery(self) -> bool:
        """A dropped store is only a future miss: preempted requests need not keep their KV."""
        return False

    # == worker side ===================================================================================
    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        """Bind vLLM's tensors (layout detected from shapes, strides and the attention backend)."""
        ctx = self._vllm_config.compilation_config.static_forward_context
        backends, isas = set(), set()
        for name in kv_caches:
            layer = ctx.get(name)
            backend = getattr(layer, "attn_backend", None)
            if backend is not None:
                backends.add(backend.get_name())
            isa = getattr(layer, "isa", None)
            if isinstance(isa, str):
                isas.add(isa)
        if len(backends) > 1:
            raise LayoutError(f"lmcache-core: layers use several attention backends {sorted(backends)}")
        backend_name = next(iter(backends), None)
        kv, names = bind_vllm_caches(kv_caches, head_dim=int(self._spec.head_size), use_mla=self.use_mla,
                                     backend=backend_name, block_size=self.block_size,
                                     isa=next(iter(isas)) if len(isas) == 1 else None)
        tp_rank, stage = self._worker_rank()
        expected = self._stage_geometry(stage)
        if kv.geometry != expected:
            raise LayoutError(
                f"lmcache-core: the KV cache tensors are {kv.geometry.signature} but the KV cache spec says "
                f"{expected.signature} for pipeline stage {stage}; the scheduler's keys would not match the worker's"
            )
        device = kv.device
        self._handle = shared_engine(expected, self.config, self.model, shard=self._shard(tp_rank, stage),
                                     device_index=int(device.index or 0) if device.type != "cpu" else 0)
        self._worker = VLLMWorker(self._handle.engine, kv, names, async_save=self.options.async_save)
        logger.info("lmcache-core worker: %s (backend %s, isa %s, shard %r)", self._worker.describe(),
                    backend_name, sorted(isas) or None, self._handle.engine.namespace.shard)

    def _worker_rank(self) -> tuple[int, int]:
        """This worker's TP rank and PP stage (0, 0 without parallelism)."""
        if self.tp_size * self.pp_size == 1:
            return 0, 0
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank()), int(get_pp_group().rank_in_group)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None and isinstance(connector_metadata, LMCacheCoreMetadata):
            self._worker.bind(connector_metadata.plan)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self._worker is not None and isinstance(kv_connector_metadata, LMCacheCoreMetadata):
            self._worker.wait_requests(kv_connector_metadata.plan.preempted)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        if self._worker is not None:
            self._worker.start_load()

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._worker is not None:
            self._worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        if self._worker is not None:
            self._worker.save_layer(layer_name)

    def wait_for_save(self) -> None:
        if self._worker is not None:
            self._worker.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        sending, recving = self._worker.get_finished(finished_req_ids)
        return sending or None, recving or None

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        update = self._worker.presence_update() if self._worker is not None else None
        return None if update is None else LMCacheCoreWorkerMeta(*update)

    def update_connector_output(self, connector_output: Any) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if self._scheduler is not None and isinstance(meta, LMCacheCoreWorkerMeta):
            self._scheduler.mirror.apply(meta.added, meta.removed, meta.reset)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.load_errors() if self._worker is not None else set()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._worker is not None:
            data: dict[str, Any] = dict(self._worker.take_stats())
        elif self._scheduler is not None:
            data = dict(self._scheduler.take_stats())
        else:
            return None
        stats = LMCacheCoreStats(data=data)
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return LMCacheCoreStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig", metric_types: dict[type, type],
                           labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]
                           ) -> KVConnectorPromMetrics | None:
        return LMCacheCorePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return True  # wait_for_layer_load / save_kv_layer run between layers

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
        if self._worker is not None:
            self._worker.close()
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    # == scheduler side ================================================================================
    def bind_gpu_block_pool(self, gpu_block_pool: "BlockPool") -> None:
        null = getattr(gpu_block_pool, "null_block", None)
        self._null_block = int(getattr(null, "block_id", 0) or 0)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        assert self._scheduler is not None
        block_ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else []
        self._scheduler.update_state_after_alloc(request, block_ids, num_external_tokens)

    def get_external_cache_hit_sources(self, request: "Request", num_external_tokens: int
                                       ) -> dict[CacheHitSource, int]:
        if num_external_tokens == 0 or self._scheduler is None:
            return {}
        tiers = self._scheduler.hit_sources(request.request_id)
        sources = [_TIER_SOURCES.get(t.rstrip("0123456789"), CacheHitSource.EXTERNAL_UNSPECIFIED) for t in tiers]
        source = CacheHitSource.outermost(sources) if sources else CacheHitSource.EXTERNAL_UNSPECIFIED
        return {source: num_external_tokens}

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self._scheduler is not None
        return LMCacheCoreMetadata(self._scheduler.build_plan(scheduler_output, self._null_block))

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        params = self._scheduler.transfer_params(request)  # disaggregated prefill: what decode is told
        return self._scheduler.request_finished(request.request_id), params


__all__ = ["LMCacheCoreConnector", "LMCacheCoreMetadata", "LMCacheCoreStats", "ConfigError"]
