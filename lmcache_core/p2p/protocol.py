"""The peer control protocol: length-prefixed msgpack frames over TCP, never pickle.

A connection starts with a mutual proof of the cluster token, which binds it to
one tenant::

    server -> {"v": 1, "peer": name, "nonce": 16 bytes}
    client -> {"v": 1, "peer": name, "tenant": T, "nonce": 16 bytes,
               "proof": HMAC(token, "c" | server nonce | client nonce | T)}
    server -> {"ok": true, "proof": HMAC(token, "s" | client nonce | server nonce | T),
               "transport": name, "endpoint": bytes}      or {"ok": false, "error": why}

Then requests, one at a time per connection::

    {"op": "get", "key": 32 bytes, "tokens": n}  -> {"desc": [agent, handle, nbytes, meta], "lease": id}
                                                   or {"desc": null, "why": "absent"|"refused"|"busy"}
    {"op": "done", "lease": id}                   (no reply: the server releases the chunk)
    {"op": "has", "keys": [32 bytes, ...]}        -> {"has": [bool, ...]}

Every message is checked where it enters (:func:`check`): frame length, types,
lengths and counts; anything else ends the connection with a logged reason.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
from typing import Any

import msgpack

from ..errors import LMCacheError

VERSION = 1
MAX_FRAME = 1 << 20
MAX_KEYS = 4096  # per "has" request
MIN_TOKEN_BYTES = 16
_LEN = struct.Struct("<I")


class ProtocolError(LMCacheError):
    """A peer sent something this protocol does not allow, or failed authentication."""


def derive_token(secret: bytes) -> bytes:
    """The HMAC key of a cluster token (any length of at least ``MIN_TOKEN_BYTES``)."""
    if len(secret) < MIN_TOKEN_BYTES:
        raise ValueError(f"a p2p cluster token needs at least {MIN_TOKEN_BYTES} bytes, got {len(secret)}")
    return hashlib.blake2b(secret, digest_size=32, person=b"lmcache-p2p-tok").digest()


def proof(key: bytes, side: bytes, first: bytes, second: bytes, tenant: str) -> bytes:
    return hmac.new(key, side + first + second + tenant.encode(), "sha256").digest()


def send(sock: socket.socket, msg: dict[str, Any]) -> None:
    data = msgpack.packb(msg, use_bin_type=True)
    sock.sendall(_LEN.pack(len(data)) + data)


def recv(sock: socket.socket) -> dict[str, Any]:
    head = _recv_exact(sock, _LEN.size)
    (n,) = _LEN.unpack(head)
    if not 0 < n <= MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes (allowed 1 to {MAX_FRAME})")
    try:
        msg = msgpack.unpackb(_recv_exact(sock, n), raw=False, strict_map_key=True, max_bin_len=MAX_FRAME)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"frame is not msgpack: {exc}") from exc
    if type(msg) is not dict:
        raise ProtocolError(f"a message must be a map, got {type(msg).__name__}")
    return msg


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    mv, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(mv[got:])
        if k == 0:
            raise ConnectionError(f"peer closed the connection ({got} of {n} bytes)")
        got += k
    return bytes(buf)


def check(msg: dict[str, Any], spec: dict[str, type | tuple[type, ...]], what: str) -> dict[str, Any]:
    """``msg`` has exactly the fields of ``spec`` (``None`` allowed where ``spec`` says so)."""
    if set(msg) != set(spec):
        raise ProtocolError(f"{what}: fields {sorted(msg)} (expected {sorted(spec)})")
    for name, typ in spec.items():
        if not isinstance(msg[name], typ) or (typ is int and isinstance(msg[name], bool)):
            raise ProtocolError(f"{what}: field {name} is a {type(msg[name]).__name__}")
    return msg


def check_key(raw: Any, what: str) -> bytes:
    if type(raw) is not bytes or len(raw) != 32:
        raise ProtocolError(f"{what}: a chunk key is 32 bytes")
    return raw


__all__ = ["MAX_FRAME", "ProtocolError", "VERSION", "check", "check_key", "derive_token", "proof", "recv", "send"]
