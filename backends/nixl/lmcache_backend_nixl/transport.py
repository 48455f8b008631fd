"""NIXL transport: one-sided READ/WRITE between NIXL agents (UCX backend).

- ``endpoint()`` is the agent's full metadata; ``connect(md)`` loads a peer's.
- ``register`` registers DRAM (any buffer: a memoryview's address) or, given a
  CUDA tensor, VRAM, and returns a descriptor whose ``meta`` is the partial
  metadata of that one registration with connection info, so a peer that
  connected before the registration can still use it (loaded once, on first use).
- ``read``/``write`` check sizes, then ``initialize_xfer`` + ``transfer``; ``poll``
  maps ``check_xfer_state`` (``DONE``/``PROC``/``ERR``) and releases the handle
  when finished; ``abort`` releases an unfinished one.
- Deregistration is revoked at the peers: UCX's shared-memory transports (one
  host) do not check a stale remote key, so a write after ``deregister`` would
  land. ``deregister`` sends a revoke notification to every connected peer and
  waits (at most ``REVOKE_WAIT_S``) for their acks (a ``private`` registration, whose
  descriptor no peer ever gets, skips this); a peer's notification
  thread records it, and a transfer to a revoked buffer fails before it starts.
  (P2P does not rely on this: its peer server lends a chunk under a lease.)
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from lmcache_core.transport import (Descriptor, Transport, TransportCapabilities, TransportError,
                                    TransportOptions)

logger = logging.getLogger(__name__)

REVOKE_WAIT_S = 2.0
_REVOKE, _ACK = b"lmcache-revoke:", b"lmcache-ack:"


#: After NIXL's partial metadata: memory type (D/V), device id, registration serial (what a
#: revoke names, so a later registration at the same address is not mistaken for it).
_TRAILER = struct.Struct("<cIQ")
REVOKED_MAX = 1 << 16


def _trailer(mem: str, dev: int, serial: int) -> bytes:
    return _TRAILER.pack(b"V" if mem == "VRAM" else b"D", dev, serial)


def _parse_trailer(meta: bytes) -> tuple[str, int, int]:
    if len(meta) <= _TRAILER.size:
        raise TransportError("nixl: a descriptor without its registration metadata")
    kind, dev, serial = _TRAILER.unpack(meta[-_TRAILER.size:])
    if kind not in (b"D", b"V"):
        raise TransportError(f"nixl: descriptor metadata names memory type {kind!r}")
    return ("VRAM" if kind == b"V" else "DRAM"), dev, serial


def _address(buffer: Any) -> tuple[int, int, str, int]:
    """``(address, nbytes, mem_type, device)`` of a memoryview/bytearray or a torch tensor."""
    if hasattr(buffer, "data_ptr"):  # a torch tensor: DRAM or VRAM
        dev = buffer.device
        return (int(buffer.data_ptr()), buffer.numel() * buffer.element_size(),
                "VRAM" if dev.type == "cuda" else "DRAM", dev.index or 0)
    import numpy as np

    arr = np.frombuffer(memoryview(buffer).cast("B"), dtype=np.uint8)
    return int(arr.ctypes.data), arr.nbytes, "DRAM", 0


class NixlTransport(Transport):
    name = "nixl"
    capabilities = TransportCapabilities(device_memory=True, cross_host=True, cross_process=True)

    def __init__(self, options: TransportOptions | None = None) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        self.options = options or TransportOptions()
        self.agent = self.options.agent or f"lmcache-{uuid.uuid4().hex[:12]}"
        from nixl._api import nixl_thread_sync_t

        # Transfers start from several threads (the tier stack's readers, the peer server's).
        self._nixl = nixl_agent(self.agent, nixl_agent_config(
            backends=["UCX"], sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_RW))
        self._lock = threading.Lock()
        #: serial -> (reg list, buffer, n, mem, dev, revoke?); one address may be registered twice
        self._regs: dict[int, tuple[Any, Any, int, str, int, bool]] = {}
        self._serial = 0
        self._peers: set[str] = set()
        self._loaded: set[bytes] = set()  # per-buffer metadata already loaded
        self._revoked: OrderedDict[tuple[str, int, int], None] = OrderedDict()  # (agent, addr, serial)
        self._acks: dict[bytes, threading.Event] = {}
        self._closed = threading.Event()
        self._notifier = threading.Thread(target=self._notif_loop, name="lmcache-nixl-notif", daemon=True)
        self._notifier.start()

    # -- registration --------------------------------------------------------------------------
    def register(self, buffer: Any, *, private: bool = False) -> Descriptor:
        addr, n, mem, dev = _address(buffer)
        reg = self._nixl.register_memory([(addr, n, dev, "")], mem)
        with self._lock:
            self._serial += 1
            serial = self._serial
        meta = self._nixl.get_partial_agent_metadata(reg, inc_conn_info=True) + _trailer(mem, dev, serial)
        with self._lock:
            self._regs[serial] = (reg, buffer, n, mem, dev, not private)
        return Descriptor(self.agent, addr, n, meta)

    def deregister(self, desc: Descriptor) -> None:
        serial = _parse_trailer(desc.meta)[2] if desc.agent == self.agent else -1
        with self._lock:
            entry = self._regs.pop(serial, None)
            peers = list(self._peers)
        if entry is None:
            return
        self._nixl.deregister_memory(entry[0])
        if not entry[5]:  # private: no peer ever had its descriptor
            return
        waits = []
        for peer in peers:
            token = f"{desc.handle}:{serial}:{uuid.uuid4().hex[:8]}".encode()
            ev = threading.Event()
            with self._lock:
                self._acks[token] = ev
            try:
                self._nixl.send_notif(peer, _REVOKE + token)
                waits.append((peer, token, ev))
            except Exception as exc:  # noqa: BLE001 - a gone peer cannot use the buffer either
                logger.debug("nixl %s: revoke to %s not sent: %s", self.agent, peer, exc)
        deadline = time.monotonic() + REVOKE_WAIT_S
        for peer, token, ev in waits:
            if not ev.wait(max(0.0, deadline - time.monotonic())):
                logger.warning("nixl %s: peer %s did not acknowledge the deregistration of %#x in %.1fs",
                               self.agent, peer, desc.handle, REVOKE_WAIT_S)
            with self._lock:
                self._acks.pop(token, None)

    def _notif_loop(self) -> None:
        while not self._closed.wait(0.002 if self._peers else 0.05):
            try:
                notifs = self._nixl.get_new_notifs()
            except Exception:  # noqa: BLE001 - closing, or a NIXL fault: log and go on
                if not self._closed.is_set():
                    logger.exception("nixl %s: reading notifications failed", self.agent)
                continue
            for sender, msgs in notifs.items():
                sender = sender.decode() if isinstance(sender, bytes) else sender
                for msg in msgs:
                    self._on_notif(sender, bytes(msg))

    def _on_notif(self, sender: str, msg: bytes) -> None:
        if msg.startswith(_REVOKE):
            token = msg[len(_REVOKE):]
            try:
                addr, serial = (int(x) for x in token.split(b":")[:2])
            except ValueError:
                return
            with self._lock:
                self._revoked[(sender, addr, serial)] = None
                while len(self._revoked) > REVOKED_MAX:
                    self._revoked.popitem(last=False)
            try:
                self._nixl.send_notif(sender, _ACK + token)
            except Exception as exc:  # noqa: BLE001
                logger.debug("nixl %s: ack to %s not sent: %s", self.agent, sender, exc)
        elif msg.startswith(_ACK):
            with self._lock:
                ev = self._acks.get(msg[len(_ACK):])
            if ev is not None:
                ev.set()

    # -- peers ---------------------------------------------------------------------------------
    def endpoint(self) -> bytes:
        return self._nixl.get_agent_metadata()

    def connect(self, endpoint: bytes) -> str:
        name = self._nixl.add_remote_agent(endpoint)
        name = name.decode() if isinstance(name, bytes) else name
        with self._lock:
            self._peers.add(name)
        return name

    def disconnect(self, agent: str) -> None:
        with self._lock:
            self._peers.discard(agent)
        try:
            self._nixl.remove_remote_agent(agent)
        except Exception as exc:  # noqa: BLE001
            logger.debug("nixl %s: removing %s: %s", self.agent, agent, exc)

    # -- transfers -----------------------------------------------------------------------------
    def _start(self, op: str, local: Descriptor, remote: Descriptor, n: int) -> Any:
        rmem, rdev, serial = _parse_trailer(remote.meta)
        mine = _parse_trailer(local.meta)[2] if local.agent == self.agent else -1
        with self._lock:
            entry = self._regs.get(mine)
            revoked = (remote.agent, remote.handle, serial) in self._revoked
            fresh = remote.meta not in self._loaded
        if entry is None or local.agent != self.agent:
            raise TransportError(f"nixl {self.agent}: local descriptor {local.handle:#x} is not registered here")
        if revoked:
            raise TransportError(f"nixl {self.agent}: {remote.agent} deregistered buffer {remote.handle:#x}")
        if fresh:  # a registration made after connect (or by a peer never connected)
            self._nixl.add_remote_agent(remote.meta[: -_TRAILER.size])
            with self._lock:
                self._loaded.add(remote.meta)
                while len(self._loaded) > REVOKED_MAX:
                    self._loaded.pop()
        _, _, _, mem, dev, _ = entry
        try:
            ldesc = self._nixl.get_xfer_descs([(local.handle, n, dev)], mem)
            rdesc = self._nixl.get_xfer_descs([(remote.handle, n, rdev)], rmem)
            handle = self._nixl.initialize_xfer(op, ldesc, rdesc, remote.agent)
            state = self._nixl.transfer(handle)
        except Exception as exc:  # noqa: BLE001 - NIXL raises its own types
            raise TransportError(f"nixl {self.agent}: {op} with {remote.agent} failed to start: {exc}") from exc
        if state == "ERR":
            self._nixl.release_xfer_handle(handle)
            raise TransportError(f"nixl {self.agent}: {op} with {remote.agent} failed at once")
        return handle

    def write(self, local: Descriptor, remote: Descriptor) -> Any:
        if local.nbytes > remote.nbytes:
            raise TransportError(f"nixl: writing {local.nbytes} bytes into a peer buffer of {remote.nbytes}")
        return self._start("WRITE", local, remote, local.nbytes)

    def read(self, local: Descriptor, remote: Descriptor) -> Any:
        if remote.nbytes > local.nbytes:
            raise TransportError(f"nixl: reading {remote.nbytes} bytes into a buffer of {local.nbytes}")
        return self._start("READ", local, remote, remote.nbytes)

    def poll(self, handle: Any) -> bool:
        state = self._nixl.check_xfer_state(handle)
        if state == "PROC":
            return False
        self._nixl.release_xfer_handle(handle)
        if state == "ERR":
            raise TransportError(f"nixl {self.agent}: transfer failed")
        return True

    def abort(self, handle: Any) -> None:
        try:
            self._nixl.release_xfer_handle(handle)
        except Exception as exc:  # noqa: BLE001
            logger.warning("nixl %s: releasing an unfinished transfer failed: %s", self.agent, exc)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._notifier.join(timeout=2)
        with self._lock:
            regs = list(self._regs.values())
            self._regs.clear()
        for reg, *_ in regs:
            try:
                self._nixl.deregister_memory(reg)
            except Exception:  # noqa: BLE001
                pass


__all__ = ["NixlTransport"]
