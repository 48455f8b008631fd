"""Detection and telemetry through NVML (nvidia-ml-py), without creating a CUDA context.

NVML talks to the driver, not the CUDA runtime, so probing it allocates nothing on
the GPU and works before (or instead of) CUDA initialisation. Every call is
wrapped: a host without the driver, a GPU that lacks a counter, or a broken
install all become a reason string, never an exception.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Callable, Iterator, Mapping

from lmcache_core.device import Detection

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "lmcache-core[cuda]"'


def visible_devices(env: Mapping[str, str] | None = None) -> list[str] | None:
    """Entries of ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs), or None when unset.

    CUDA stops at the first invalid entry (``-1`` hides everything after it), so do we.
    """
    env = os.environ if env is None else env
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    out: list[str] = []
    for part in raw.split(","):
        part = part.strip()
        if not part or part.startswith("-"):
            break
        out.append(part)
    return out


def physical_device(index: int, env: Mapping[str, str] | None = None) -> int | str:
    """NVML's view of torch's ``cuda:index``: a physical index or a UUID (prefix)."""
    visible = visible_devices(env)
    if visible is None:
        return index
    if index >= len(visible):
        raise IndexError(f"cuda:{index} is not visible: CUDA_VISIBLE_DEVICES lists {len(visible)} device(s)")
    entry = visible[index]
    return int(entry) if entry.isdigit() else entry


class _NVML:
    """nvmlInit/nvmlShutdown as a context; raises with a readable reason."""

    def __init__(self) -> None:
        import pynvml

        self.m = pynvml

    def __enter__(self) -> Any:
        self.m.nvmlInit()
        return self.m

    def __exit__(self, *exc: object) -> None:
        try:
            self.m.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _why_nvml_failed(exc: BaseException) -> str:
    name = type(exc).__name__
    if "LibraryNotFound" in name:
        return f"NVML library not found: no NVIDIA driver on this host ({name})"
    if "DriverNotLoaded" in name:
        return f"the NVIDIA kernel driver is not loaded ({name})"
    if "NoPermission" in name:
        return f"no permission to open the NVIDIA devices ({name})"
    return f"NVML failed: {name}: {exc}"


def detect(env: Mapping[str, str] | None = None) -> Detection:
    """Is an NVIDIA GPU usable by this process's torch? Never creates a CUDA context."""
    if importlib.util.find_spec("pynvml") is None:
        return Detection(False, f"nvidia-ml-py (pynvml) is not installed; install it with: {INSTALL_HINT}")
    try:
        with _NVML() as nv:
            count = int(nv.nvmlDeviceGetCount())
            names = [_text(nv.nvmlDeviceGetName(nv.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
            driver = _text(nv.nvmlSystemGetDriverVersion())
    except Exception as exc:  # noqa: BLE001 - absence of the driver is the common case
        return Detection(False, _why_nvml_failed(exc))
    if count == 0:
        return Detection(False, "NVML reports no NVIDIA GPU", 0, {"driver": driver})
    visible = visible_devices(env)
    usable = count if visible is None else min(count, len(visible))
    details = {"driver": driver, "names": names, "physical_count": count}
    if usable == 0:
        return Detection(False, "CUDA_VISIBLE_DEVICES hides every GPU", 0, details)
    torch_ok, torch_why = torch_build()
    if not torch_ok:
        return Detection(False, torch_why, usable, details)
    return Detection(True, f"{usable} NVIDIA GPU(s): {', '.join(names[:usable])}; driver {driver}", usable, details)


def torch_build() -> tuple[bool, str]:
    """Whether the installed torch is a CUDA build (importing torch creates no context)."""
    if importlib.util.find_spec("torch") is None:
        return False, f"torch is not installed; install a CUDA build of torch, then {INSTALL_HINT}"
    import torch

    if getattr(torch.version, "hip", None):
        return False, f"torch {torch.__version__} is a ROCm build; use device: rocm"
    if not getattr(torch.version, "cuda", None):
        return False, f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda})"


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _fields(nv: Any, h: Any) -> Iterator[tuple[str, Callable[[], Any]]]:
    yield "name", lambda: _text(nv.nvmlDeviceGetName(h))
    yield "uuid", lambda: _text(nv.nvmlDeviceGetUUID(h))
    mem = None

    def memory() -> Any:
        nonlocal mem
        if mem is None:
            mem = nv.nvmlDeviceGetMemoryInfo(h)
        return mem

    yield "memory_total", lambda: int(memory().total)
    yield "memory_used", lambda: int(memory().used)
    yield "memory_free", lambda: int(memory().free)
    yield "utilization_gpu_pct", lambda: int(nv.nvmlDeviceGetUtilizationRates(h).gpu)
    yield "utilization_memory_pct", lambda: int(nv.nvmlDeviceGetUtilizationRates(h).memory)
    yield "pcie_gen", lambda: int(nv.nvmlDeviceGetCurrPcieLinkGeneration(h))
    yield "pcie_gen_max", lambda: int(nv.nvmlDeviceGetMaxPcieLinkGeneration(h))
    yield "pcie_width", lambda: int(nv.nvmlDeviceGetCurrPcieLinkWidth(h))
    yield "pcie_width_max", lambda: int(nv.nvmlDeviceGetMaxPcieLinkWidth(h))
    yield "pcie_tx_kBps", lambda: int(nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_TX_BYTES))
    yield "pcie_rx_kBps", lambda: int(nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_RX_BYTES))
    yield "temperature_c", lambda: int(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
    yield "power_w", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0


def telemetry(index: int, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Memory, utilisation and PCIe link of torch's ``cuda:index``; missing counters are left out
    and the reason of a total failure is returned under ``error``."""
    out: dict[str, Any] = {"index": index}
    try:
        dev = physical_device(index, env)
        with _NVML() as nv:
            h = nv.nvmlDeviceGetHandleByIndex(dev) if isinstance(dev, int) else nv.nvmlDeviceGetHandleByUUID(dev)
            for key, read in _fields(nv, h):
                try:
                    out[key] = read()
                except Exception as exc:  # noqa: BLE001 - a counter this GPU lacks
                    logger.debug("NVML counter %s unavailable: %s", key, exc)
    except Exception as exc:  # noqa: BLE001
        out["error"] = _why_nvml_failed(exc) if "NVML" in type(exc).__name__ else f"{type(exc).__name__}: {exc}"
    return out
