"""CUDA/HIP IPC: share a device tensor with another process as a msgpack handle (never pickle).

Shared by the CUDA and ROCm device plugins (torch's HIP build speaks the same API).

The handle carries torch's CUDA IPC description of the tensor's storage (memory
handle, reference-counter file, event) plus dtype, shape, strides and offset. The
exporting process must keep the tensor alive while importers use it; torch's
reference counter tells it when they are done. CUDA refuses to open a handle in
the process that created it, so an import in the exporting process is an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    import torch

FORMAT = 1


def export_tensor(t: "torch.Tensor") -> bytes:
    """Handle bytes for a CUDA tensor, for :func:`import_tensor` in another process."""
    if t.device.type != "cuda":
        raise ValueError(f"CUDA IPC exports device tensors; this one is on {t.device}")
    storage = t.untyped_storage()
    (device, handle, size, offset, ref_handle, ref_offset, event, event_sync) = storage._share_cuda_()
    meta: dict[str, Any] = {
        "v": FORMAT, "device": int(device), "handle": bytes(handle), "size": int(size), "offset": int(offset),
        "ref_handle": bytes(ref_handle), "ref_offset": int(ref_offset),
        "event": bytes(event) if event is not None else None, "event_sync": bool(event_sync),
        "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "stride": list(t.stride()),
        "storage_offset": int(t.storage_offset()),
    }
    return msgpack.packb(meta)


def import_tensor(data: bytes) -> "torch.Tensor":
    """The tensor an exporter described, mapped into this process (no copy)."""
    import torch

    try:
        m = msgpack.unpackb(data)
        if m.get("v") != FORMAT:
            raise ValueError(f"IPC handle format {m.get('v')!r}, this build reads {FORMAT}")
        dtype = getattr(torch, m["dtype"])
    except (KeyError, TypeError, AttributeError, msgpack.UnpackException) as exc:
        raise ValueError(f"not a CUDA IPC handle of lmcache-kernels: {exc}") from exc
    torch.cuda._lazy_init()  # opening a handle needs the runtime up; torch's own rebuild does the same
    storage = torch.UntypedStorage._new_shared_cuda(
        m["device"], m["handle"], m["size"], m["offset"], m["ref_handle"], m["ref_offset"],
        m["event"], m["event_sync"],
    )
    out = torch.empty(0, dtype=dtype, device=torch.device("cuda", m["device"]))
    out.set_(storage, m["storage_offset"], tuple(m["shape"]), tuple(m["stride"]))
    return out
