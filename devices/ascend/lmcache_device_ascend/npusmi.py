"""Parse ``npu-smi info``: the NPU table Huawei's driver tool prints, for detection and telemetry.

Each NPU takes two rows of the first table: ``| id name | health | power temp
hugepages |`` then ``| chip | bus-id | aicore% memory used/total hbm used/total |``.
The process table that follows (``| NPU Chip | Process id | ...``) is ignored.
Running the tool creates no device context.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

_USAGE = re.compile(r"(\d+)\s*/\s*(\d+)")


@dataclass(frozen=True)
class NpuInfo:
    """One NPU as ``npu-smi info`` reports it (memory figures in MB, as printed)."""

    npu: int
    name: str
    health: str
    power_w: float | None = None
    temperature_c: int | None = None
    bus_id: str = ""
    aicore_pct: int | None = None
    hbm_used_mb: int | None = None
    hbm_total_mb: int | None = None


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_info(text: str) -> list[NpuInfo]:
    """The NPUs listed in ``npu-smi info`` output (empty when the table is absent)."""
    out: list[NpuInfo] = []
    pending: dict[str, object] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = _cells(line)
        if len(cells) < 3:
            continue
        if cells[0].startswith(("NPU", "Chip")) and not cells[0].split()[-1].isdigit():
            if "Process" in line:
                break  # the process table: no more NPU rows
            continue  # header rows
        first = cells[0].split()
        if pending is None and len(first) >= 2 and first[0].isdigit():
            nums = cells[2].split()
            pending = {"npu": int(first[0]), "name": " ".join(first[1:]), "health": cells[1],
                       "power_w": _float(nums[0]) if nums else None,
                       "temperature_c": _int(nums[1]) if len(nums) > 1 else None}
        elif pending is not None and len(first) == 1 and first[0].isdigit():
            usage = _USAGE.findall(cells[2])
            hbm = usage[-1] if len(usage) >= 2 else (usage[0] if usage else None)
            nums = cells[2].split()
            pending.update(bus_id=cells[1], aicore_pct=_int(nums[0]) if nums else None,
                           hbm_used_mb=int(hbm[0]) if hbm else None, hbm_total_mb=int(hbm[1]) if hbm else None)
            out.append(NpuInfo(**pending))  # type: ignore[arg-type]
            pending = None
    return out


def _float(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def _int(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        return None


def run_info(timeout: float = 10.0) -> tuple[list[NpuInfo], str]:
    """Run ``npu-smi info``; returns the NPUs, or an empty list and the reason."""
    exe = shutil.which("npu-smi")
    if exe is None:
        return [], "npu-smi is not on PATH (Ascend driver tools not installed)"
    try:
        res = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return [], f"npu-smi failed: {type(exc).__name__}: {exc}"
    if res.returncode != 0:
        return [], f"npu-smi exited {res.returncode}: {res.stderr.strip()[:200]}"
    npus = parse_info(res.stdout)
    return npus, "" if npus else "npu-smi listed no NPU"
