"""StreamDevice: the part of an accelerator device plugin that CUDA, ROCm and Ascend share.

It implements the data-movement half of :class:`lmcache_core.device.Device` over a
torch backend module with streams and events (``torch.cuda`` for CUDA and HIP
builds, ``torch.npu`` for Ascend) and a :class:`~lmcache_kernels.transfer.KVTransfer`.

Batching without changing the engine: inside ``use_stream(s)`` the per-chunk,
per-layer ``gather``/``scatter`` calls the engine makes are collected and launched
as one batch (one kernel for every chunk of the layer) when the block ends or an
event is recorded, whichever comes first. Outside a ``use_stream`` block every
call runs at once. ``gather_many``/``scatter_many`` take a whole batch directly
(all layers of many chunks in one launch); an engine may call them when present.
Subclasses add detection, telemetry, IPC and direct storage.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

from lmcache_core.device import CodedPart, Device, Event, check_device_codec

from .transfer import KVTransfer, TransferOptions, _out_of_memory

if TYPE_CHECKING:
    import torch

    from lmcache_core.layout import PagedKV

    from .reference import Batch

logger = logging.getLogger(__name__)


class TorchEvent(Event):
    """A backend event: ``synchronize`` blocks the host, ``wait_on_compute`` only the current stream."""

    def __init__(self, event: Any, backend: Any, device: "torch.device") -> None:
        self.event = event
        self.backend = backend
        self.device = device

    def synchronize(self) -> None:
        self.event.synchronize()

    def wait_on_compute(self) -> None:
        self.backend.current_stream(self.device).wait_event(self.event)

    def query(self) -> bool:
        return bool(self.event.query())


class _Pending(threading.local):
    def __init__(self) -> None:
        self.depth = 0
        self.key: tuple[Any, ...] | None = None
        self.kv: Any = None
        self.layers: Sequence[int] | None = None
        self.batch: list[tuple[Any, Any]] = []


class StreamDevice(Device):
    """Device base over a torch backend with streams; subclasses set ``backend_name``."""

    backend_name: ClassVar[str] = "cuda"  # torch.<backend_name> holds Stream, Event, stream(), ...
    torch_type: ClassVar[str] = "cuda"  # the torch device type of KV tensors

    def __init__(self, index: int = 0, options: TransferOptions | None = None) -> None:
        super().__init__(index)
        self._options = options
        self._transfer: KVTransfer | None = None
        self._pending = _Pending()
        self._init_lock = threading.Lock()
        self._fp8_off = ""  # why the fused fp8 kernel is not used (it failed once), or ""

    # -- basics ------------------------------------------------------------------------------
    @property
    def backend(self) -> Any:
        import torch

        return getattr(torch, self.backend_name)

    @property
    def torch_device(self) -> "torch.device":
        import torch

        return torch.device(self.torch_type, self.index)

    @property
    def transfer(self) -> KVTransfer:
        if self._transfer is None:
            with self._init_lock:
                if self._transfer is None:
                    self._transfer = KVTransfer(self.torch_device, self._options or TransferOptions.from_env(),
                                                self.backend)
        return self._transfer

    def alloc_host(self, nbytes: int) -> "torch.Tensor":
        import torch

        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def register_host(self, tensor: "torch.Tensor") -> None:
        """Page-lock memory mapped from elsewhere (the daemon's arena) for async DMA
        (``cudaHostRegister``; torch maps it to ``hipHostRegister`` on ROCm)."""
        if self.backend_name != "cuda" or tensor.numel() == 0:
            return
        import torch

        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(tensor.data_ptr(), tensor.numel(), 0)
        code = getattr(err, "value", err)
        if code not in (0, 712):  # 712: cudaErrorHostMemoryAlreadyRegistered
            cudart.cudaGetLastError()  # clear it, or torch reports it at its next kernel launch
            raise RuntimeError(f"cudaHostRegister of {tensor.numel()} bytes failed with error {code}")

    def unregister_host(self, tensor: "torch.Tensor") -> None:
        if self.backend_name != "cuda" or tensor.numel() == 0:
            return
        import torch

        cudart = torch.cuda.cudart()
        err = cudart.cudaHostUnregister(tensor.data_ptr())
        if getattr(err, "value", err) != 0:
            cudart.cudaGetLastError()

    # -- data movement -------------------------------------------------------------------------
    def gather(self, kv: "PagedKV", slots: "torch.Tensor", out: "torch.Tensor",
               layers: Sequence[int] | None = None) -> None:
        self._submit(True, kv, slots, out, layers)

    def scatter(self, kv: "PagedKV", slots: "torch.Tensor", src: "torch.Tensor",
                layers: Sequence[int] | None = None) -> None:
        self._submit(False, kv, slots, src, layers)

    def gather_many(self, kv: "PagedKV", batch: "Batch", layers: Sequence[int] | None = None) -> None:
        """Gather a whole batch of ``(slots, chunk)`` pairs in one go (one launch per layer run)."""
        self._flush()
        self.transfer.gather(kv, batch, layers)

    def scatter_many(self, kv: "PagedKV", batch: "Batch", layers: Sequence[int] | None = None) -> None:
        """Scatter a whole batch of ``(slots, chunk)`` pairs in one go."""
        self._flush()
        self.transfer.scatter(kv, batch, layers)

    def gather_coded(self, kv: "PagedKV", parts: Sequence[CodedPart], codec: str,
                     layers: Sequence[int] | None = None) -> None:
        """fp8 quantised inside the gather kernel (:func:`lmcache_kernels.fp8.gather_coded`); the
        slots of a batch are range-checked once (cached like :meth:`gather_many`'s)."""
        self._coded(True, kv, parts, codec, layers)

    def scatter_coded(self, kv: "PagedKV", parts: Sequence[CodedPart], codec: str,
                      layers: Sequence[int] | None = None) -> None:
        """fp8 dequantised inside the scatter kernel; the inverse of :meth:`gather_coded`."""
        self._coded(False, kv, parts, codec, layers)

    def _coded(self, gather: bool, kv: "PagedKV", parts: Sequence[CodedPart], codec: str,
               layers: Sequence[int] | None) -> None:
        from . import fp8
        from .triton_copy import plane_table

        check_device_codec(codec)
        self._flush()
        why = self._fp8_off or ("" if self.transfer.kernel_ok else self.transfer.kernel_reason)
        if not why:
            table, why = plane_table(kv)
            why = why if table is None else ""
        if not why:
            pairs = [(p.slots, p.image) for p in parts]
            sig = self.transfer._sig(pairs)
            self.transfer.check_slots(kv, pairs, sig)
            cache = sig.extra if sig is not None else None  # the kernel's tables, per batch
            run = fp8.gather_coded if gather else fp8.scatter_coded
            try:
                run(kv, parts, layers, checked=True, cache=cache)
                return
            except (ValueError, IndexError):
                raise  # the caller's mistake, not the kernel's
            except Exception as exc:  # noqa: BLE001 - a kernel fault falls back, the engine keeps going
                fault: BaseException = exc
            # no device memory to stage in: the kernel maps the images where they are pinned (a
            # pageable address read through UVA would fault the device context), else this call
            # takes the reference; an out-of-memory is this call's, never a reason to stop the kernel
            if _out_of_memory(fault) and self.transfer.mapped_host()[0] and all(
                    p.image.device.type != "cpu" or p.image.is_pinned() for p in parts):
                try:
                    run(kv, parts, layers, checked=True, stage="never", cache=cache)
                    return
                except Exception as exc:  # noqa: BLE001
                    fault = exc
            if not _out_of_memory(fault):
                self._fp8_off = f"{type(fault).__name__}: {fault}"
                logger.warning("fp8 kernel failed on %s (%s); using the torch reference from now on",
                               self.torch_device, self._fp8_off)
        (super().gather_coded if gather else super().scatter_coded)(kv, parts, codec, layers)

    def _submit(self, gather: bool, kv: "PagedKV", slots: "torch.Tensor", chunk: "torch.Tensor",
                layers: Sequence[int] | None) -> None:
        st = self._pending
        if st.depth == 0:
            (self.transfer.gather if gather else self.transfer.scatter)(kv, [(slots, chunk)], layers)
            return
        self.transfer.check_slots(kv, [(slots, chunk)])  # a bad slot fails this call, not a later flush
        key = (gather, id(kv), layers if layers is None or isinstance(layers, tuple) else tuple(layers))
        if st.batch and st.key != key:
            self._flush()
        st.key, st.kv, st.layers = key, kv, layers
        st.batch.append((slots, chunk))

    def _flush(self) -> None:
        st = self._pending
        if not st.batch:
            return
        batch, kv, layers, key = st.batch, st.kv, st.layers, st.key
        st.batch, st.kv, st.key = [], None, None
        assert key is not None
        (self.transfer.gather if key[0] else self.transfer.scatter)(kv, batch, layers)

    def _drop_pending(self) -> None:
        st = self._pending
        st.batch, st.kv, st.key = [], None, None

    # -- streams and events ----------------------------------------------------------------------
    def new_stream(self) -> Any:
        """A transfer stream, at the highest priority the backend offers when the transfer
        options say ``stream_priority="high"`` (torch maps an out-of-range priority to the
        nearest valid one; a backend whose streams take no priority gets a plain stream)."""
        if self.transfer.options.stream_priority == "high":
            try:
                return self.backend.Stream(self.torch_device, priority=-(1 << 10))
            except (TypeError, ValueError, RuntimeError):
                pass
        return self.backend.Stream(self.torch_device)

    @contextlib.contextmanager
    def use_stream(self, stream: Any) -> Iterator[None]:
        self._flush()  # work batched by an enclosing block belongs to the enclosing stream
        ctx = self.backend.stream(stream) if stream is not None else contextlib.nullcontext()
        st = self._pending
        with ctx:
            st.depth += 1
            try:
                yield
            except BaseException:
                self._drop_pending()  # the caller is unwinding; its buffers may be released
                raise
            else:
                self._flush()
            finally:
                st.depth -= 1

    def record_event(self, stream: Any = None) -> Event:
        self._flush()
        backend = self.backend
        ev = backend.Event()
        ev.record(stream if stream is not None else backend.current_stream(self.torch_device))
        return TorchEvent(ev, backend, self.torch_device)

    def synchronize(self) -> None:
        self._flush()
        self.backend.synchronize(self.torch_device)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self._transfer is not None:
            out["transfer"] = self._transfer.describe()
        return out


class SyncBackend:
    """The slice of the ``torch.cuda`` stream API that :class:`StreamDevice` uses, for host
    memory: streams and events exist, work runs at once. It lets the batching logic run (and be
    tested) on a CPU, with the kernels in the Triton interpreter."""

    class Stream:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def wait_event(self, event: Any) -> None:
            pass

        def synchronize(self) -> None:
            pass

    class Event:
        def record(self, stream: Any = None) -> None:
            pass

        def synchronize(self) -> None:
            pass

        def query(self) -> bool:
            return True

    def stream(self, stream: Any) -> Any:
        return contextlib.nullcontext()

    def current_stream(self, device: Any = None) -> Any:
        return self.Stream()

    def synchronize(self, device: Any = None) -> None:
        pass


class HostStreamDevice(StreamDevice):
    """A StreamDevice over host memory and :class:`SyncBackend`: the CPU stand-in the tests and
    the benchmark's ``--dry-run`` use to exercise batching, plans and every transfer path."""

    name = "host-stream"
    auto_select = False
    torch_type = "cpu"

    @classmethod
    def detect(cls) -> "Any":
        from lmcache_core.device import Detection

        return Detection(True, "host memory with the torch.cuda stream API emulated synchronously", 1)

    @property
    def backend(self) -> Any:
        return _SYNC

    @property
    def transfer(self) -> KVTransfer:
        if self._transfer is None:
            self._transfer = KVTransfer(self.torch_device, self._options or TransferOptions.from_env(), None)
        return self._transfer

    def alloc_host(self, nbytes: int) -> "torch.Tensor":
        import torch

        return torch.empty(nbytes, dtype=torch.uint8)


_SYNC = SyncBackend()

