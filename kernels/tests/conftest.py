"""Run the Triton kernels in the interpreter when no GPU is present (CI is CPU only).

The variable must be set before triton is imported, so it is set here, at
collection time, unless a GPU is visible or the caller chose a value.
"""

from __future__ import annotations

import os


def _gpu_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML, no GPU
        return False


if "TRITON_INTERPRET" not in os.environ and not _gpu_present():
    os.environ["TRITON_INTERPRET"] = "1"
