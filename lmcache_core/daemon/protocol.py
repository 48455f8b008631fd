"""Control-plane messages between engines and the daemon: length-prefixed msgpack maps.

A frame is a 4-byte big-endian length and a msgpack map (never pickle). Every request has
``op``; each op's fields and their types are checked here (:func:`check_request`) before
the server looks at them, so a malformed, truncated or oversized message is a
:class:`ProtocolError` with a reason, logged by the server, never an exception in its
handlers. File descriptors (the arena) travel as SCM_RIGHTS ancillary data on Unix sockets.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
MAX_FRAME = 16 << 20  # a 128K-token request's keys and slots take ~40 KiB; anything near this is bad input
MAX_ITEMS = 1 << 16  # keys or slots in one message
KEY_BYTES = 32
_LEN = struct.Struct(">I")


class ProtocolError(ValueError):
    """A message that does not follow the protocol (the peer is refused with this reason)."""


class Closed(ConnectionError):
    """The peer closed the connection."""


def encode(msg: dict[str, Any]) -> bytes:
    data = msgpack.packb(msg, use_bin_type=True)
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return _LEN.pack(len(data)) + data


def decode(data: bytes) -> dict[str, Any]:
    """One frame body to a map; anything else is a ProtocolError."""
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                              max_bin_len=MAX_FRAME, max_str_len=1 << 16, max_array_len=MAX_ITEMS,
                              max_map_len=64, max_ext_len=0)
    except Exception as exc:  # noqa: BLE001 - every decoder failure is the peer's bad input
        raise ProtocolError(f"undecodable message ({type(exc).__name__}: {exc})") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"a message must be a map, got {type(msg).__name__}")
    return msg


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    frame = encode(msg)
    if fds:
        socket.send_fds(sock, [frame], fds)
    else:
        sock.sendall(frame)


def _recv_exact(sock: socket.socket, n: int, fds: list[int] | None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if fds is not None and not buf:
            data, got, _flags, _addr = socket.recv_fds(sock, n - len(buf), 4)
            fds.extend(got)
        else:
            data = sock.recv(n - len(buf))
        if not data:
            if buf:
                raise ProtocolError(f"truncated message: {len(buf)} of {n} bytes before the peer closed")
            raise Closed("peer closed the connection")
        buf += data
    return bytes(buf)


def recv(sock: socket.socket, fds: list[int] | None = None) -> dict[str, Any]:
    """Read one frame. With ``fds`` (a list), file descriptors sent with it are appended."""
    head = _recv_exact(sock, _LEN.size, fds)
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
    return decode(_recv_exact(sock, n, None))


# -- request schemas --------------------------------------------------------------------
# field -> type tag: "int", "bool", "str", "bin", "keys" (list of 32-byte keys), "ints" (list of
# non-negative ints), "commits" (list of [slot, key, num_tokens, nbytes]), "float".
_SCHEMAS: dict[str, dict[str, str]] = {
    "hello": {"v": "int", "kind": "str", "token": "str", "pid": "int"},
    "ns": {"model": "str", "layout": "str", "salt": "str", "shard": "str"},
    "lookup": {"keys": "keys", "fast": "bool", "pin": "bool"},
    "unpin": {"keys": "keys"},
    "get": {"keys": "keys"},
    "alloc": {"sizes": "ints"},
    "commit": {"items": "commits"},
    "delete": {"keys": "keys"},
    "clear": {"ns": "bin"},
    "flush": {"timeout": "float"},
    "stats": {},
    "ping": {},
}
_OPTIONAL = {"rel": "ints", "id": "int"}  # slots to release first (piggybacked); request id
#: optional fields of one op: ``ns``'s device codec (a kv_codec client's namespace)
_OP_OPTIONAL: dict[str, dict[str, str]] = {"ns": {"codec": "str"}}


def _is_uint(v: Any) -> bool:
    return type(v) is int and 0 <= v < 1 << 62


def _check(name: str, tag: str, value: Any) -> None:
    ok: bool
    if tag == "int":
        ok = type(value) is int
    elif tag == "bool":
        ok = type(value) is bool
    elif tag == "str":
        ok = type(value) is str
    elif tag == "bin":
        ok = type(value) is bytes and len(value) <= 64
    elif tag == "float":
        ok = type(value) in (int, float) and 0 <= value < 1e6
    elif tag == "keys":
        ok = type(value) is list and all(type(k) is bytes and len(k) == KEY_BYTES for k in value)
    elif tag == "ints":
        ok = type(value) is list and all(_is_uint(v) for v in value)
    elif tag == "commits":
        ok = type(value) is list and all(
            type(it) is list and len(it) == 4 and _is_uint(it[0]) and type(it[1]) is bytes
            and len(it[1]) == KEY_BYTES and _is_uint(it[2]) and _is_uint(it[3]) for it in value)
    else:  # pragma: no cover - a schema typo
        raise AssertionError(tag)
    if not ok:
        raise ProtocolError(f"field {name!r} must be {tag}, got {type(value).__name__}")


def check_request(msg: dict[str, Any]) -> str:
    """Validate a request against its op's schema; returns the op."""
    op = msg.get("op")
    if type(op) is not str or op not in _SCHEMAS:
        raise ProtocolError(f"unknown op {op!r}")
    schema = _SCHEMAS[op]
    for name, value in msg.items():
        if name == "op":
            continue
        tag = schema.get(name) or _OPTIONAL.get(name) or _OP_OPTIONAL.get(op, {}).get(name)
        if tag is None:
            raise ProtocolError(f"op {op!r} has no field {name!r}")
        _check(name, tag, value)
    missing = [n for n in schema if n not in msg]
    if missing:
        raise ProtocolError(f"op {op!r} is missing {', '.join(missing)}")
    return op
