"""The transport contract: move registered host buffers to and from a peer.

A transport registers local buffers (returning a descriptor a peer can use),
then reads or writes between a local descriptor and a peer's descriptor;
completion is polled. Daemon mode and NIXL build on this.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class TransportCapabilities:
    device_memory: bool = False  # can register accelerator memory
    cross_host: bool = False


@dataclass(frozen=True)
class Descriptor:
    """A registered buffer as a peer sees it: opaque agent id, address/handle and length."""

    agent: str
    handle: int
    nbytes: int


class Transport(abc.ABC):
    name: ClassVar[str] = ""
    capabilities: ClassVar[TransportCapabilities] = TransportCapabilities()

    @abc.abstractmethod
    def register(self, buffer: memoryview) -> Descriptor:
        """Make ``buffer`` addressable by peers; keep it alive until deregistered."""

    @abc.abstractmethod
    def deregister(self, desc: Descriptor) -> None: ...

    @abc.abstractmethod
    def write(self, local: Descriptor, remote: Descriptor) -> Any:
        """Start copying ``local`` into the peer's ``remote``; returns a handle to poll."""

    @abc.abstractmethod
    def read(self, local: Descriptor, remote: Descriptor) -> Any:
        """Start copying the peer's ``remote`` into ``local``; returns a handle to poll."""

    @abc.abstractmethod
    def poll(self, handle: Any) -> bool:
        """True when done; raises on a failed transfer."""

    def close(self) -> None: ...
