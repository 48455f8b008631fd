"""The CUDA plugin's logic that runs on any host: registration, detection reasons, parsing, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmcache_core.plugins import PluginManager
from lmcache_device_cuda import gds, nvml
from lmcache_device_cuda.device import CUDADevice


def test_registered_through_its_entry_point() -> None:
    pm = PluginManager(allow="cuda", block="")
    info = pm.plugins["cuda"]
    assert info.status == "loaded" and info.distribution == "lmcache-device-cuda"
    assert info.hooks == ["lmcache_register_devices"]
    reg = pm.get("device", "cuda")
    assert reg.factory == "lmcache_device_cuda.device:CUDADevice" and reg.extra == "cuda"
    assert reg.load() is CUDADevice


def test_capabilities_are_declared() -> None:
    caps = CUDADevice.capabilities
    assert caps.accelerator and caps.async_copy and caps.pinned_memory and caps.ipc
    assert caps.direct_storage is False  # only an instance that found nvidia-fs says True


def test_detection_gives_a_reason_and_creates_no_context() -> None:
    det = CUDADevice.detect()
    assert isinstance(det.available, bool)
    if not det.available:
        assert det.reason and det.count >= 0
        assert any(w in det.reason for w in ("NVML", "driver", "GPU", "torch", "CUDA_VISIBLE_DEVICES"))
    # in a fresh process (other tests here may have initialised CUDA): detect, then ask torch
    code = ("from lmcache_device_cuda.device import CUDADevice; d = CUDADevice.detect(); "
            "import torch; print(d.available, torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", []), ("0,1", ["0", "1"]), ("2, 3", ["2", "3"]), ("1,-1,2", ["1"]),
     ("GPU-8a7b,GPU-99", ["GPU-8a7b", "GPU-99"])],
)
def test_visible_devices_parsing(value, expected) -> None:
    env = {} if value is None else {"CUDA_VISIBLE_DEVICES": value}
    assert nvml.visible_devices(env) == expected


def test_physical_device_mapping() -> None:
    assert nvml.physical_device(1, {}) == 1
    assert nvml.physical_device(1, {"CUDA_VISIBLE_DEVICES": "4,6"}) == 6
    assert nvml.physical_device(0, {"CUDA_VISIBLE_DEVICES": "GPU-8a7b"}) == "GPU-8a7b"
    with pytest.raises(IndexError, match="CUDA_VISIBLE_DEVICES lists 1"):
        nvml.physical_device(1, {"CUDA_VISIBLE_DEVICES": "3"})


def test_hidden_gpus_are_reported_as_such() -> None:
    det = nvml.detect({"CUDA_VISIBLE_DEVICES": ""})
    assert not det.available
    if det.details.get("physical_count"):
        assert "hides every GPU" in det.reason


def test_telemetry_never_raises() -> None:
    out = nvml.telemetry(0)
    assert out["index"] == 0
    assert "memory_total" in out or "error" in out


def test_gds_status_has_a_reason() -> None:
    st = gds.status(open_driver=False)
    assert st.mode in ("gds", "compat", "none") and st.reason


def test_ipc_refuses_host_tensors() -> None:
    import torch

    with pytest.raises(ValueError, match="device tensors"):
        CUDADevice().ipc_export(torch.zeros(4))
    with pytest.raises(ValueError, match="not a CUDA IPC handle"):
        CUDADevice().ipc_import(b"\x81\xa1v\x01")


def test_selecting_an_absent_gpu_names_the_reason() -> None:
    if CUDADevice.detect().available:
        pytest.skip("a GPU is present: the absence path cannot be checked here")
    from lmcache_core.plugins import resolve_device
    from lmcache_core.errors import PluginError

    pm = PluginManager(allow="cuda", block="")
    with pytest.raises(PluginError, match="not available"):
        resolve_device("cuda", pm)
    assert resolve_device("auto", pm).name != "cuda"
