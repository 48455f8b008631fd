"""Upstream LMCache's config keys: which of ours replaces each, and ``lmcache config import``.

Both projects read ``LMCACHE_CONFIG_FILE`` and ``LMCACHE_*`` variables, so an upstream YAML
or environment reaches our loader. :func:`hint` names the key of ours that replaces an
upstream key (``Config.from_dict`` puts it in the error; the environment reader in a
warning); :func:`convert` turns an upstream YAML mapping into the equivalent config of ours
and lists what it could not carry over. Upstream's keys are those of
``lmcache/v1/config.py`` (``_CONFIG_DEFINITIONS``); the table is in docs/configuration.md.
Chunks stored by upstream LMCache are not readable by lmcache-core (other keys and
format): the import moves settings, never data.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError

IMPORT_HINT = "`lmcache config import FILE` writes the equivalent lmcache-core config"
UPSTREAM_CPU_GB = 5.0  # upstream's defaults: local_cpu true, max_local_cpu_size 5.0 (GiB)


@dataclass(frozen=True)
class UpstreamKey:
    """One upstream key: the key of ours that replaces it ("" if none) and how."""

    name: str
    ours: str
    how: str


_MAPPED = (
    UpstreamKey("chunk_size", "chunk_size", "the same key: tokens per chunk"),
    UpstreamKey("local_cpu", "tiers", "true: a memory:// tier first in tiers"),
    UpstreamKey("max_local_cpu_size", "tiers", "GiB -> memory://?capacity=<N>GiB"),
    UpstreamKey("local_disk", "tiers", "file:///path or /path -> disk:///path (an absolute path)"),
    UpstreamKey("max_local_disk_size", "tiers", "GiB -> disk:///path?capacity=<N>GiB"),
    UpstreamKey("remote_url", "tiers", "redis://, rediss://, unix://, valkey://, s3:// URLs as a tier "
                "after the local ones; lm://, mooncakestore://, infinistore:// and others have no tier"),
    UpstreamKey("remote_serde", "codec", "naive -> none (the default); other serdes (cachegen, kivi) are not "
                "converted: choose a codec of ours"),
    UpstreamKey("save_unfull_chunk", "save_partial", "the same meaning"),
    UpstreamKey("pre_caching_hash_algorithm", "hash_algorithm", "ours are xxh3_128 (default) and blake2b; "
                "keys never match upstream's, whichever is chosen"),
    UpstreamKey("lmcache_instance_id", "", "there is no controller"),
    UpstreamKey("use_layerwise", "", "no key: the vLLM connector always loads and saves layer by layer"),
    UpstreamKey("enable_async_loading", "", "the vLLM connector option async_load (kv_connector_extra_config)"),
    UpstreamKey("blocking_timeout_secs", "", "no key: tier timeouts are URL options (timeout=, docs/storage.md)"),
    UpstreamKey("extra_config", "", "no equivalent; connector options go in kv_connector_extra_config"),
)

# Upstream keys of features lmcache-core does not have (blending, P2P, PD, controller, GDS, ...).
_UNSUPPORTED = (
    "local_cpu_use_hugepages reserve_local_cpu_size local_disk_path_sharding save_decode_cache "
    "enable_blending blend_recompute_ratios blend_thresholds blend_check_layers blend_min_tokens "
    "blend_special_str retrieve_locations store_location enable_p2p p2p_host p2p_init_ports "
    "p2p_lookup_ports mp_host mp_port enable_controller controller_pull_url controller_reply_url "
    "controller_url lmcache_worker_ports lmcache_worker_port lmcache_worker_ids "
    "lmcache_worker_heartbeat_delay_time lmcache_worker_heartbeat_time enable_pd enable_xpyd pd_role "
    "pd_buffer_size pd_buffer_device pd_peer_host pd_peer_init_port pd_peer_alloc_port pd_peer_query_port "
    "pd_proxy_host pd_proxy_port pd_allocation_timeout_sec pd_shutdown_timeout_sec "
    "pd_condition_poll_interval_sec pd_max_prefill_len pd_backend_mode pd_skip_proxy_notification "
    "pd_bidirectional transfer_channel nixl_backends nixl_buffer_size nixl_buffer_device nixl_role "
    "nixl_peer_host nixl_peer_port nixl_peer_init_port nixl_peer_alloc_port nixl_proxy_host nixl_proxy_port "
    "gds_path gds_path_sharding gds_buffer_size use_gds gds_backend cufile_buffer_size weka_path maru_path "
    "maru_pool_size audit_actual_remote_url internal_api_server_host internal_api_server_enabled "
    "internal_api_server_port_start internal_api_server_include_index_list "
    "internal_api_server_socket_path_prefix external_lookup_client py_enable_gc cache_policy "
    "cost_aware_half_life_seconds cost_aware_ewma_alpha numa_mode priority_limit runtime_plugin_locations "
    "plugin_locations storage_plugins external_backends remote_storage_plugins lookup_timeout_ms "
    "min_retrieve_tokens hit_miss_ratio lookup_server_worker_ids enable_scheduler_bypass_lookup "
    "script_allowed_imports enable_lazy_memory_allocator lazy_memory_initial_ratio "
    "lazy_memory_expand_trigger_ratio lazy_memory_step_ratio lazy_memory_safe_size enable_chunk_statistics "
    "chunk_statistics_auto_start_statistics chunk_statistics_auto_exit_timeout_hours "
    "chunk_statistics_auto_exit_target_unique_chunks chunk_statistics_strategy enable_kv_events "
    "use_gpu_connector_v3 pin_timeout_sec pin_check_interval_sec remote_config_url app_id "
    "enable_hidden_state_cache max_hidden_state_cpu_size hidden_state_layers hidden_states_retrieve_mode "
    "use_experimental"
).split()

_NONE = "no equivalent in lmcache-core"
UPSTREAM_KEYS: dict[str, UpstreamKey] = {k.name: k for k in _MAPPED}
for _name in _UNSUPPORTED:
    UPSTREAM_KEYS.setdefault(_name, UpstreamKey(_name, "", _NONE))

# remote_url schemes that are a tier of ours as written (docs/storage.md)
_STORAGE_KEYS = ("local_cpu", "max_local_cpu_size", "local_disk", "max_local_disk_size", "remote_url")
_REMOTE_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys", "s3")


def hint(key: str) -> str | None:
    """For an upstream key: what replaces it in lmcache-core; None for any other key."""
    up = UPSTREAM_KEYS.get(key.replace("-", "_").lower())
    if up is None:
        return None
    if up.ours == up.name:
        return None  # the same key in both (chunk_size): nothing to say
    if not up.ours:
        extra = "" if up.how == _NONE else f" ({up.how})"
        return f"{up.name!r} is an upstream LMCache key with no lmcache-core equivalent{extra}"
    return f"{up.name!r} is an upstream LMCache key; use {up.ours} ({up.how})"


def upstream_keys_message(raw: Mapping[str, Any], known: Any) -> str | None:
    """The error for a config that holds upstream keys: each with what replaces it; else None."""
    hints = [h for k in raw if str(k).replace("-", "_").lower() not in known and (h := hint(str(k)))]
    if not hints:
        return None
    return f"{'; '.join(hints)}. {IMPORT_HINT} from an upstream file"


@dataclass
class Imported:
    """The converted config and what the conversion did, line by line."""

    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def _gib(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: expected a number of GiB (upstream LMCache's unit), got {value!r}")
    try:
        gib = float(value)
    except ValueError:
        raise ConfigError(f"{key}: expected a number of GiB (upstream LMCache's unit), got {value!r}") from None
    if not gib >= 0 or gib == float("inf"):
        raise ConfigError(f"{key}: expected a finite number of GiB >= 0, got {value!r}")
    return gib


def _size(gib: float) -> str:
    mib = gib * 1024
    return f"{gib:g}GiB" if float(gib).is_integer() else f"{int(round(mib))}MiB"


def _tiers(raw: Mapping[str, Any], out: Imported) -> list[str]:
    """local_cpu / local_disk / remote_url with upstream's defaults -> our tier URLs, fastest first."""
    from .config import parse_bool

    tiers: list[str] = []
    if parse_bool(raw.get("local_cpu", True), key="local_cpu"):
        gib = _gib(raw.get("max_local_cpu_size", UPSTREAM_CPU_GB), "max_local_cpu_size")
        if gib > 0:
            tiers.append(f"memory://?capacity={_size(gib)}")
            out.notes.append(f"local_cpu/max_local_cpu_size -> tiers: memory://?capacity={_size(gib)}")
        else:
            out.notes.append("max_local_cpu_size is 0: no memory tier")
    elif "max_local_cpu_size" in raw:
        out.notes.append("local_cpu is false: max_local_cpu_size (upstream's staging buffer) is not carried over")
    disk = raw.get("local_disk")
    if disk:
        path = str(disk)
        path = path[len("file://"):] if path.startswith("file://") else path
        if not path.startswith("/"):
            raise ConfigError(f"local_disk: {disk!r} is not an absolute path; lmcache-core's disk tier needs one, "
                              f"e.g. file:///var/cache/lmcache/")
        gib = _gib(raw.get("max_local_disk_size", 0.0), "max_local_disk_size")
        if gib > 0:
            url = f"disk://{urllib.parse.quote(path.rstrip('/') or '/')}?capacity={_size(gib)}"
            tiers.append(url)
            out.notes.append(f"local_disk/max_local_disk_size -> tiers: {url}")
        else:
            out.dropped.append("local_disk: max_local_disk_size is 0 or unset, so upstream keeps no disk "
                               "cache; no disk tier written")
    elif "max_local_disk_size" in raw:
        out.dropped.append("max_local_disk_size: no local_disk is set")
    remote = raw.get("remote_url")
    if remote:
        scheme = urllib.parse.urlsplit(str(remote)).scheme.lower()
        if scheme in _REMOTE_SCHEMES:
            tiers.append(str(remote))
            out.notes.append(f"remote_url -> tiers: {remote}")
        else:
            out.dropped.append(f"remote_url: {remote!r}: lmcache-core has no {scheme}:// tier (tiers: memory, disk, "
                               "redis, valkey, s3; docs/storage.md)")
    if not tiers:
        raise ConfigError("the upstream config keeps no cache lmcache-core can use (local_cpu false or "
                          "max_local_cpu_size 0, no local_disk, no supported remote_url); set tiers yourself, "
                          "e.g. tiers: ['memory://?capacity=4GiB']")
    return tiers


def convert(raw: Mapping[str, Any]) -> Imported:
    """An upstream LMCache config mapping -> the equivalent lmcache-core config.

    Keys of ours pass through; mapped upstream keys are converted (sizes are GiB upstream);
    every other upstream key is listed in ``dropped`` with the reason. The result still has
    to load (``Config.from_dict``), which the CLI checks before writing it."""
    from .config import Config, parse_bool

    ours = {f for f in Config.__dataclass_fields__}
    out = Imported()
    raw = {str(k).replace("-", "_").lower(): v for k, v in raw.items()}
    for key, value in raw.items():
        if key in UPSTREAM_KEYS and key not in ("chunk_size",):
            continue
        if key in ours:
            out.config[key] = value
        else:
            raise ConfigError(f"{key!r} is neither an upstream LMCache key nor an lmcache-core key; remove it "
                              f"or check its spelling")
    storage = [k for k in _STORAGE_KEYS if k in raw]
    if "tiers" in out.config and storage:
        raise ConfigError(f"the file sets both tiers (lmcache-core) and upstream storage keys "
                          f"({', '.join(storage)}); keep one of them")
    if "tiers" not in out.config:
        out.config["tiers"] = _tiers(raw, out)
    serde = raw.get("remote_serde")
    if serde is not None and str(serde).lower() != "naive":
        out.dropped.append(f"remote_serde: {serde!r} is not converted; choose a codec of ours (docs/configuration.md)")
    if "save_unfull_chunk" in raw:
        out.config["save_partial"] = parse_bool(raw["save_unfull_chunk"], key="save_unfull_chunk")
        out.notes.append(f"save_unfull_chunk -> save_partial: {str(out.config['save_partial']).lower()}")
    if "pre_caching_hash_algorithm" in raw:
        out.dropped.append(f"pre_caching_hash_algorithm: {raw['pre_caching_hash_algorithm']!r}: lmcache-core's "
                           "chunk keys differ from upstream's whatever the hash (hash_algorithm: xxh3_128 kept)")
    for key in raw:
        up = UPSTREAM_KEYS.get(key)
        if up and not up.ours:
            out.dropped.append(f"{key}: {up.how}")
    return out


def render(imported: Imported, source: str) -> str:
    """The converted config as YAML, headed by what was converted and what was not."""
    import yaml

    lines = [f"# lmcache-core config converted from the upstream LMCache config {source}",
             "# by `lmcache config import` (mapping: docs/configuration.md). Upstream's chunks are not",
             "# readable by lmcache-core: the cache starts empty."]
    lines += [f"#   {n}" for n in imported.notes]
    if imported.dropped:
        lines.append("# Not carried over:")
        lines += [f"#   {d}" for d in imported.dropped]
    return "\n".join(lines) + "\n" + yaml.safe_dump(imported.config, sort_keys=False)
