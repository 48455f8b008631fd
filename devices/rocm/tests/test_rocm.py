"""The ROCm plugin without AMD hardware: registration, sysfs topology parsing, detection reasons."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcache_core.plugins import PluginManager
from lmcache_device_rocm import smi
from lmcache_device_rocm.device import ROCmDevice, detect_rocm, torch_build

# Recorded shape of /sys/class/kfd/kfd/topology/nodes/<n>/properties (values trimmed):
# node 0 is the host CPU, nodes 1-2 two MI300X GPUs (gfx942).
CPU_NODE = """cpu_cores_count 96
simd_count 0
mem_banks_count 1
gfx_target_version 0
vendor_id 0
device_id 0
"""
GPU_NODE = """cpu_cores_count 0
simd_count 1216
mem_banks_count 1
caches_count 470
gfx_target_version 90402
vendor_id 4098
device_id 29857
location_id 2048
drm_render_minor 128
num_xcc 8
"""


def _tree(root: Path, nodes: dict[int, str]) -> str:
    for n, props in nodes.items():
        d = root / str(n)
        d.mkdir(parents=True)
        (d / "properties").write_text(props)
        (d / "name").write_text("gfx942\n" if "90402" in props else "\n")
    return str(root)


def test_registered_through_its_entry_point() -> None:
    pm = PluginManager(allow="rocm", block="")
    assert pm.plugins["rocm"].status == "loaded"
    reg = pm.get("device", "rocm")
    assert reg.extra == "rocm" and reg.load() is ROCmDevice
    caps = ROCmDevice.capabilities
    assert caps.accelerator and caps.async_copy and caps.ipc and not caps.direct_storage


def test_properties_parsing_and_gfx_names() -> None:
    props = smi.parse_properties(GPU_NODE + "marketing_name AMD Instinct\n")
    assert props["simd_count"] == 1216 and "marketing_name" not in props
    assert smi.KfdNode(1, props).gfx_target == "gfx942"
    assert smi.KfdNode(1, {"simd_count": 1, "gfx_target_version": 90010}).gfx_target == "gfx90a"
    assert smi.KfdNode(1, {"simd_count": 1, "gfx_target_version": 110000}).gfx_target == "gfx1100"


def test_sysfs_probe_counts_gpu_nodes_only(tmp_path: Path) -> None:
    root = _tree(tmp_path / "nodes", {0: CPU_NODE, 1: GPU_NODE, 2: GPU_NODE})
    p = smi.probe_sysfs(root)
    assert (p.source, p.count, p.names) == ("sysfs", 2, ("gfx942", "gfx942"))
    cpu_only = _tree(tmp_path / "cpu", {0: CPU_NODE})
    assert smi.probe_sysfs(cpu_only).error == "KFD lists no GPU node"
    assert "amdgpu driver not loaded" in smi.probe_sysfs(str(tmp_path / "absent")).error


def test_detection_with_gpus_but_a_non_rocm_torch(tmp_path: Path) -> None:
    ok, why = torch_build()
    if ok:
        pytest.skip(f"torch is a ROCm build here ({why})")
    root = _tree(tmp_path / "nodes", {0: CPU_NODE, 1: GPU_NODE})
    det = detect_rocm(root)
    if det.details.get("source") in ("amdsmi", "pyrsmi"):
        pytest.skip("a real AMD management library answered")
    assert not det.available and det.count == 1
    assert "not a ROCm (HIP) build" in det.reason


def test_detection_without_any_amd_gpu_explains_each_source(tmp_path: Path) -> None:
    det = detect_rocm(str(tmp_path / "absent"))
    if det.count:
        pytest.skip("AMD GPUs are present here")
    assert not det.available
    assert "amdsmi" in det.reason and "pyrsmi" in det.reason and "KFD" in det.reason


def test_missing_amdsmi_is_a_reason_not_a_crash() -> None:
    p = smi.probe_amdsmi()
    assert p.count > 0 or p.error.startswith("amdsmi")
    tel = smi.telemetry(0)
    assert tel["index"] == 0 and ("memory_total" in tel or "error" in tel)
