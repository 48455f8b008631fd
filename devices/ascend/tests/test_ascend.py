"""The Ascend plugin without NPUs: registration, npu-smi parsing of recorded tables, detection reasons."""

from __future__ import annotations

import pytest

from lmcache_core.plugins import PluginManager
from lmcache_device_ascend import npusmi
from lmcache_device_ascend.device import AscendDevice, detect_ascend

# The table layout npu-smi 24.x prints on an 8-card 910B3 host (two cards kept, values changed),
# followed by the process table, which must be ignored.
INFO_24 = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 24.1.rc1                 Version: 24.1.rc1                                             |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B3               | OK            | 97.5        41                0    / 0             |
| 0                         | 0000:C1:00.0  | 3           0    / 0          3301 / 65536         |
+===========================+===============+====================================================+
| 1     910B3               | Warning       | 88.1        38                0    / 0             |
| 0                         | 0000:C2:00.0  | 0           0    / 0          57120/ 65536         |
+===========================+===============+====================================================+
+---------------------------+---------------+----------------------------------------------------+
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
| 0       0                 | 41234         | python3                  | 52000                   |
+===========================+===============+====================================================+
"""

# The wider layout of npu-smi 26.x (same columns, more padding), one 910B4 card.
INFO_26 = """\
| npu-smi 26.0.rc1                            Version: 26.0.rc1                                                    |
| NPU   Name                | Health        | Power(W)             Temp(C)                 Hugepages-Usage(page)   |
| Chip                      | Bus-Id        | AICore(%)            Memory-Usage(MB)        HBM-Usage(MB)           |
| 0     910B4               | OK            | 82.6                 32                      0    / 0                |
| 0                         | 0000:C1:00.0  | 0                    0    / 0                2871 / 32768            |
"""


def test_registered_through_its_entry_point() -> None:
    pm = PluginManager(allow="ascend", block="")
    assert pm.plugins["ascend"].status == "loaded"
    reg = pm.get("device", "ascend")
    assert reg.extra == "ascend" and "torch_npu" in reg.requires
    caps = AscendDevice.capabilities
    assert caps.accelerator and caps.async_copy and caps.pinned_memory and not caps.ipc


def test_parse_two_cards_and_ignore_the_process_table() -> None:
    npus = npusmi.parse_info(INFO_24)
    assert [n.npu for n in npus] == [0, 1]
    a, b = npus
    assert (a.name, a.health, a.power_w, a.temperature_c) == ("910B3", "OK", 97.5, 41)
    assert (a.bus_id, a.aicore_pct, a.hbm_used_mb, a.hbm_total_mb) == ("0000:C1:00.0", 3, 3301, 65536)
    assert (b.health, b.hbm_used_mb, b.hbm_total_mb) == ("Warning", 57120, 65536)


def test_parse_the_wider_layout() -> None:
    (n,) = npusmi.parse_info(INFO_26)
    assert (n.name, n.temperature_c, n.hbm_used_mb, n.hbm_total_mb) == ("910B4", 32, 2871, 32768)


def test_parse_garbage_gives_nothing() -> None:
    assert npusmi.parse_info("") == []
    assert npusmi.parse_info("command not found\n| a | b |\n") == []


def test_detection_without_torch_npu_says_how_to_install() -> None:
    det = detect_ascend()
    if det.available:
        pytest.skip("an Ascend NPU is present here")
    assert "torch_npu" in det.reason or "npu-smi" in det.reason


def test_selecting_ascend_without_torch_npu_names_the_extra() -> None:
    from lmcache_core.errors import MissingDependencyError

    pm = PluginManager(allow="ascend", block="")
    reg = pm.get("device", "ascend")
    if not reg.missing_modules():
        pytest.skip("torch_npu is installed here")
    with pytest.raises(MissingDependencyError, match=r"lmcache-core\[ascend\]"):
        reg.load()
