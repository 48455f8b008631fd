"""AMD GPU detection and telemetry: amdsmi, then pyrsmi, then the KFD topology in sysfs.

None of these creates a HIP context. amdsmi is imported inside ``try/except
Exception``: when its shared library is missing, version 7 raises ``KeyError``
('libamd_smi.so') at import, not ImportError, and pyrsmi passes the same error
through when amdsmi is installed. The sysfs reader needs no library at all and is
what the tests exercise with recorded topology files.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

KFD_NODES = "/sys/class/kfd/kfd/topology/nodes"


@dataclass(frozen=True)
class KfdNode:
    """One KFD topology node; GPUs have SIMDs and a gfx target version."""

    node: int
    properties: dict[str, int] = field(default_factory=dict)
    name: str = ""

    @property
    def is_gpu(self) -> bool:
        return self.properties.get("simd_count", 0) > 0

    @property
    def gfx_target(self) -> str:
        """``gfx942`` style name from ``gfx_target_version`` (90402 -> gfx942)."""
        v = self.properties.get("gfx_target_version", 0)
        if not v:
            return self.name
        major, minor, step = v // 10000, (v // 100) % 100, v % 100
        return f"gfx{major}{minor:x}{step:x}"


def parse_properties(text: str) -> dict[str, int]:
    """``key value`` lines of a KFD ``properties`` file; non-integer values are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def kfd_nodes(root: str = KFD_NODES) -> list[KfdNode]:
    """Every node under ``root`` (empty when the amdgpu KFD driver is absent)."""
    nodes = []
    for path in sorted(glob.glob(os.path.join(root, "*")), key=lambda p: int(os.path.basename(p) or 0)
                       if os.path.basename(p).isdigit() else 1 << 30):
        base = os.path.basename(path)
        if not base.isdigit():
            continue
        try:
            with open(os.path.join(path, "properties")) as f:
                props = parse_properties(f.read())
        except OSError:
            continue
        name = ""
        try:
            with open(os.path.join(path, "name")) as f:
                name = f.read().strip()
        except OSError:
            pass
        nodes.append(KfdNode(int(base), props, name))
    return nodes


@dataclass(frozen=True)
class Probe:
    """Outcome of one detection source."""

    source: str  # "amdsmi" | "pyrsmi" | "sysfs"
    count: int
    names: tuple[str, ...] = ()
    error: str = ""


def probe_amdsmi() -> Probe:
    try:
        import amdsmi  # KeyError, OSError or ImportError when libamd_smi is missing
    except Exception as exc:  # noqa: BLE001
        return Probe("amdsmi", 0, error=f"amdsmi unusable ({type(exc).__name__}: {exc})")
    try:
        amdsmi.amdsmi_init()
        try:
            handles = amdsmi.amdsmi_get_processor_handles()
            names = []
            for h in handles:
                try:
                    names.append(str(amdsmi.amdsmi_get_gpu_asic_info(h).get("market_name", "AMD GPU")))
                except Exception:  # noqa: BLE001
                    names.append("AMD GPU")
            return Probe("amdsmi", len(handles), tuple(names))
        finally:
            amdsmi.amdsmi_shut_down()
    except Exception as exc:  # noqa: BLE001
        return Probe("amdsmi", 0, error=f"amdsmi failed ({type(exc).__name__}: {exc})")


def probe_pyrsmi() -> Probe:
    try:
        from pyrsmi import rocml
    except Exception as exc:  # noqa: BLE001 - including amdsmi's KeyError passed through
        return Probe("pyrsmi", 0, error=f"pyrsmi unusable ({type(exc).__name__}: {exc})")
    try:
        rocml.smi_initialize()
        try:
            n = int(rocml.smi_get_device_count())
            return Probe("pyrsmi", n, tuple(str(rocml.smi_get_device_name(i)) for i in range(n)))
        finally:
            rocml.smi_shutdown()
    except Exception as exc:  # noqa: BLE001
        return Probe("pyrsmi", 0, error=f"pyrsmi failed ({type(exc).__name__}: {exc})")


def probe_sysfs(root: str = KFD_NODES) -> Probe:
    gpus = [n for n in kfd_nodes(root) if n.is_gpu]
    if not gpus:
        why = "no KFD topology (amdgpu driver not loaded)" if not os.path.isdir(root) else "KFD lists no GPU node"
        return Probe("sysfs", 0, error=why)
    return Probe("sysfs", len(gpus), tuple(n.gfx_target for n in gpus))


def probe(root: str = KFD_NODES) -> tuple[Probe, list[str]]:
    """The first source that finds GPUs, and the reasons the others gave."""
    reasons: list[str] = []
    for fn in (probe_amdsmi, probe_pyrsmi):
        p = fn()
        if p.count > 0:
            return p, reasons
        reasons.append(p.error or f"{p.source}: no AMD GPU")
    p = probe_sysfs(root)
    if p.count == 0:
        reasons.append(p.error)
    return p, reasons


def telemetry(index: int) -> dict[str, Any]:
    """VRAM and activity of GPU ``index`` through amdsmi or pyrsmi; ``error`` says why not."""
    out: dict[str, Any] = {"index": index}
    try:
        import amdsmi

        amdsmi.amdsmi_init()
        try:
            h = amdsmi.amdsmi_get_processor_handles()[index]
            vram = amdsmi.amdsmi_get_gpu_vram_usage(h)
            out["memory_total"] = int(vram["vram_total"]) * 1024 * 1024
            out["memory_used"] = int(vram["vram_used"]) * 1024 * 1024
            act = amdsmi.amdsmi_get_gpu_activity(h)
            out["utilization_gpu_pct"] = act.get("gfx_activity")
            out["utilization_memory_pct"] = act.get("umc_activity")
            out["source"] = "amdsmi"
            return out
        finally:
            amdsmi.amdsmi_shut_down()
    except Exception as exc:  # noqa: BLE001
        logger.debug("amdsmi telemetry unavailable: %s", exc)
        out["error"] = f"amdsmi: {type(exc).__name__}: {exc}"
    try:
        from pyrsmi import rocml

        rocml.smi_initialize()
        try:
            out["memory_total"] = int(rocml.smi_get_device_memory_total(index))
            out["memory_used"] = int(rocml.smi_get_device_memory_used(index))
            out["utilization_gpu_pct"] = int(rocml.smi_get_device_utilization(index))
            out["source"] = "pyrsmi"
            out.pop("error", None)
        finally:
            rocml.smi_shutdown()
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{out.get('error', '')}; pyrsmi: {type(exc).__name__}: {exc}".lstrip("; ")
    return out
