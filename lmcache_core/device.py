"""The device contract: what a device plugin provides to the engine.

A device moves KV between an engine's paged cache (:class:`PagedKV`) and chunk
tensors ``[layers, planes, tokens, hidden]`` in host buffers, allocates those
host buffers (pinned where it can), and offers streams and events so the engine
can load layer ``i + 1`` while layer ``i`` computes. ``detect()`` must never
create a device context: it probes management libraries and says why not.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, NamedTuple, Sequence

if TYPE_CHECKING:
    import torch

    from .layout import PagedKV


@dataclass(frozen=True)
class Detection:
    """Result of ``Device.detect()``: is the hardware usable, and if not, why."""

    available: bool
    reason: str = ""
    count: int = 0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceCapabilities:
    """What a device can do; the engine and the conformance suite read these."""

    async_copy: bool = False  # copies run on streams and overlap compute
    pinned_memory: bool = False  # alloc_host returns page-locked memory
    ipc: bool = False  # ipc_export / ipc_import (daemon mode)
    direct_storage: bool = False  # storage <-> device without a host bounce (GDS)
    accelerator: bool = False  # False for host CPU devices (cpu, arm)


#: Codecs a device can fuse into its copies (the engine's ``kv_codec``): chunk buffers then hold
#: the codec's stored form, gathered and scattered without a plain copy on the host.
DEVICE_CODECS = ("fp8",)


class CodedPart(NamedTuple):
    """One chunk of a coded gather or scatter: ``image`` (uint8, 1-D) is the stored form of all
    ``num_tokens`` tokens of the chunk; ``slots`` are those of tokens ``first .. first+len(slots)``
    (a gather always covers the whole chunk; a scatter may write part of it)."""

    slots: "torch.Tensor"
    image: "torch.Tensor"
    num_tokens: int
    first: int = 0


def check_device_codec(codec: str) -> None:
    if codec not in DEVICE_CODECS:
        raise ValueError(f"no device codec {codec!r}; device codecs are {', '.join(DEVICE_CODECS)}")


class Event(abc.ABC):
    """Completion marker of work queued on a stream."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Block the calling thread until the work is done."""

    def wait_on_compute(self) -> None:
        """Make the engine's compute stream wait (no host block). Defaults to synchronize."""
        self.synchronize()

    def query(self) -> bool:
        return True


class DoneEvent(Event):
    """An event for work that ran synchronously."""

    def synchronize(self) -> None:
        return None


class Device(abc.ABC):
    """Base class of device plugins. Subclasses set ``name`` and ``capabilities``."""

    name: ClassVar[str] = ""
    capabilities: ClassVar[DeviceCapabilities] = DeviceCapabilities()
    #: May ``device: auto`` pick this device? False for test and reference devices,
    #: which are used only when named.
    auto_select: ClassVar[bool] = True

    @classmethod
    @abc.abstractmethod
    def detect(cls) -> Detection:
        """Probe for the hardware without creating a context; explain an absence."""

    def __init__(self, index: int = 0) -> None:
        self.index = index

    @property
    @abc.abstractmethod
    def torch_device(self) -> "torch.device":
        """Where the engine's KV tensors for this device live."""

    # -- memory ------------------------------------------------------------------
    def alloc_host(self, nbytes: int) -> "torch.Tensor":
        """A 1-D uint8 host tensor of ``nbytes`` (pinned when ``capabilities.pinned_memory``)."""
        import torch

        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.capabilities.pinned_memory)

    def register_host(self, tensor: "torch.Tensor") -> None:
        """Make host memory this process did not allocate (the daemon's shared arena) usable for
        fast async copies, as ``alloc_host`` memory is: ``cudaHostRegister`` / ``hipHostRegister``
        on accelerators. The default does nothing (host devices, or a device without it: copies
        then run from pageable memory, correct but slower)."""
        return None

    def unregister_host(self, tensor: "torch.Tensor") -> None:
        """Undo :meth:`register_host` (before the memory is unmapped)."""
        return None

    # -- data movement -------------------------------------------------------------
    @abc.abstractmethod
    def gather(
        self, kv: "PagedKV", slots: "torch.Tensor", out: "torch.Tensor", layers: Sequence[int] | None = None
    ) -> None:
        """Copy tokens at ``slots`` of ``kv`` into ``out[layers, :, :len(slots)]`` (chunk layout).

        ``out`` is a host (or device) tensor ``[layers, planes, tokens, hidden]`` of the
        KV dtype. Enqueued on the current stream; completion via ``record_event``.
        """

    @abc.abstractmethod
    def scatter(
        self, kv: "PagedKV", slots: "torch.Tensor", src: "torch.Tensor", layers: Sequence[int] | None = None
    ) -> None:
        """Copy ``src[layers, :, :len(slots)]`` into ``kv`` at ``slots``; the inverse of gather."""

    def gather_many(self, kv: "PagedKV", batch: Sequence[tuple["torch.Tensor", "torch.Tensor"]],
                    layers: Sequence[int] | None = None) -> None:
        """Gather a batch of ``(slots, out)`` pairs (several chunks of one request) in one go.

        The engine always calls this; the default loops over :meth:`gather`. Devices
        with kernels override it to launch once per batch (all chunks, all ``layers``).
        """
        for slots, out in batch:
            self.gather(kv, slots, out, layers)

    def scatter_many(self, kv: "PagedKV", batch: Sequence[tuple["torch.Tensor", "torch.Tensor"]],
                     layers: Sequence[int] | None = None) -> None:
        """Scatter a batch of ``(slots, src)`` pairs in one go; the inverse of :meth:`gather_many`."""
        for slots, src in batch:
            self.scatter(kv, slots, src, layers)

    def gather_coded(self, kv: "PagedKV", parts: Sequence[CodedPart], codec: str,
                     layers: Sequence[int] | None = None) -> None:
        """Gather whole chunks straight into ``codec``'s stored form (a name of
        :data:`DEVICE_CODECS`): ``fp8`` writes e4m3 values and a scale per token and head, the
        image :mod:`lmcache_core.codecs.fp8` decodes, so any tier and any reader takes it.

        The default is the torch reference and synchronous: each chunk is gathered plain into a
        temporary on the KV cache's device and quantised there. Devices with a fused kernel
        (``lmcache_kernels.fp8``) override it, keeping the order of :meth:`gather_many`."""
        import torch

        from .codecs import fp8
        from .layout import torch_dtype

        check_device_codec(codec)
        g = kv.geometry
        sel = list(range(g.num_layers)) if layers is None else list(layers)
        for slots, image, n, first in parts:
            if first or int(slots.numel()) != n:
                raise ValueError(f"a coded gather writes whole chunks: {int(slots.numel())} slots from token "
                                 f"{first} of a {n}-token image")
            q, s = fp8.image_views(g, image, n)
            plain = torch.empty(g.shape(n), dtype=torch_dtype(g.dtype), device=kv.device)
            self.gather(kv, slots, plain, sel)
            self.synchronize()  # every stream: the reference waits for its own copies
            for layer in sel:
                fp8.encode_into(plain[layer].to(image.device), q[layer], s[layer], g.head_dim)

    def scatter_coded(self, kv: "PagedKV", parts: Sequence[CodedPart], codec: str,
                      layers: Sequence[int] | None = None) -> None:
        """Decode ``parts`` (images of :meth:`gather_coded`'s form, or a part of each) into ``kv``;
        the inverse of :meth:`gather_coded`. The default dequantises with the torch reference on
        the KV cache's device and is synchronous."""
        import torch

        from .codecs import fp8
        from .layout import torch_dtype

        check_device_codec(codec)
        g = kv.geometry
        dtype = torch_dtype(g.dtype)
        sel = list(range(g.num_layers)) if layers is None else list(layers)
        for slots, image, n, first in parts:
            m = int(slots.numel())
            if first < 0 or first + m > n:
                raise ValueError(f"{m} slots from token {first} do not fit a {n}-token image")
            q, s = fp8.image_views(g, image, n)
            plain = torch.empty(g.shape(m), dtype=dtype, device=kv.device)
            for layer in sel:
                plain[layer] = fp8.decode_from(q[layer, :, first:first + m], s[layer, :, first:first + m],
                                               g.head_dim, dtype).to(kv.device)
            self.scatter(kv, slots, plain, sel)
            self.synchronize()  # every stream: the reference waits for its own copies

    # -- streams and events ------------------------------------------------------------
    def new_stream(self) -> Any:
        """A stream for transfers; None where work is synchronous."""
        return None

    @contextlib.contextmanager
    def use_stream(self, stream: Any) -> Iterator[None]:
        """Run enclosed work on ``stream``."""
        yield

    def record_event(self, stream: Any = None) -> Event:
        """An event completing when work queued so far on ``stream`` is done."""
        return DoneEvent()

    def synchronize(self) -> None:
        return None

    # -- optional capabilities ---------------------------------------------------------
    def ipc_export(self, tensor: "torch.Tensor") -> bytes:
        raise NotImplementedError(f"device {self.name!r} does not support IPC (capabilities.ipc is False)")

    def ipc_import(self, handle: bytes) -> "torch.Tensor":
        raise NotImplementedError(f"device {self.name!r} does not support IPC (capabilities.ipc is False)")

    def telemetry(self) -> dict[str, Any]:
        """Memory, utilisation, link facts; whatever the management library offers."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "capabilities": self.capabilities.__dict__}
