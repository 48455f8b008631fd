"""The transport contract: move registered host buffers to and from a peer.

A transport is one endpoint (an *agent*). It registers local buffers, returning
a :class:`Descriptor` a peer can use, then reads or writes between a local
descriptor and a peer's descriptor; completion is polled. Before a first
transfer each side makes the other reachable: ``b.connect(a.endpoint())`` and
the reverse (NIXL exchanges agent metadata that way; TCP passes an address).
A descriptor may carry ``meta``: bytes the peer needs for that one buffer
(NIXL's partial metadata of a registration made after the connect); a
transport loads it on the first use of the descriptor.

Transfers are one-sided: the peer's process takes no part beyond having
registered the buffer. A transfer to a descriptor its owner deregistered, or
larger than either buffer, fails (``poll`` raises); it never writes elsewhere.

Constructors take one :class:`TransportOptions`; a transport ignores the fields
it has no use for. P2P sharing (:mod:`lmcache_core.p2p`) and daemon mode build on this.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import LMCacheError


class TransportError(LMCacheError):
    """A transfer failed: the peer is gone, the descriptor is unknown or too small."""


@dataclass(frozen=True)
class TransportCapabilities:
    device_memory: bool = False  # can register accelerator memory
    cross_host: bool = False
    cross_process: bool = False  # peers in other processes (every real transport; not ``local``)


@dataclass(frozen=True)
class TransportOptions:
    """What a transport may be configured with. ``agent``: this endpoint's name (default: a
    random unique one); ``host``: the address peers reach it on; ``port``: 0 for any free
    one; ``secret``: a shared secret a peer must prove before any transfer (TCP); ``timeout``:
    seconds a single transfer may take before it fails."""

    agent: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    secret: bytes | None = None
    timeout: float = 10.0


@dataclass(frozen=True)
class Descriptor:
    """A registered buffer as a peer sees it: the owner's agent name, address/handle, length
    and the transport's per-buffer metadata (``meta``, opaque, may be empty)."""

    agent: str
    handle: int
    nbytes: int
    meta: bytes = b""


class Transport(abc.ABC):
    name: ClassVar[str] = ""
    capabilities: ClassVar[TransportCapabilities] = TransportCapabilities()

    @abc.abstractmethod
    def register(self, buffer: memoryview, *, private: bool = False) -> Descriptor:
        """Make ``buffer`` addressable by peers; keep it alive until deregistered. ``private``:
        only this endpoint's own transfers use it (its descriptor is never handed to a peer), so
        deregistering it need not tell the peers."""

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
        """True when done; raises on a failed transfer (the handle is then finished)."""

    def endpoint(self) -> bytes:
        """What a peer passes to :meth:`connect` to reach this endpoint (default: the agent name)."""
        return getattr(self, "agent", "").encode()

    def connect(self, endpoint: bytes) -> str:
        """Make the peer whose :meth:`endpoint` this is reachable; returns its agent name."""
        return endpoint.decode()

    def disconnect(self, agent: str) -> None:
        """Forget a peer (its metadata, connections); later transfers to it fail."""

    def wait(self, handle: Any, timeout: float) -> None:
        """Poll ``handle`` until done; raises what poll raises, or TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        spins = 0
        while not self.poll(handle):
            if time.monotonic() > deadline:
                self.abort(handle)
                raise TimeoutError(f"{self.name} transfer not complete after {timeout:g} s")
            spins += 1
            time.sleep(0 if spins < 100 else 0.0002)

    def abort(self, handle: Any) -> None:
        """Give up on an unfinished transfer (release what it holds); default: nothing to do."""

    def close(self) -> None: ...


__all__ = ["Descriptor", "Transport", "TransportCapabilities", "TransportError", "TransportOptions"]
