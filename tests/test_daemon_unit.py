"""Daemon pieces on their own: the message decoder (fuzzed), the arena allocator, addresses, settings."""
from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_core.daemon import protocol
from lmcache_core.daemon.address import parse_address
from lmcache_core.daemon.arena import ExtentAllocator
from lmcache_core.daemon.settings import hash_token, load_settings
from lmcache_core.errors import ConfigError

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_refuses_random_bytes_with_a_reason(data):
    try:
        protocol.check_request(protocol.decode(data))
    except protocol.ProtocolError as exc:
        assert str(exc)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(protocol._SCHEMAS)), st.dictionaries(st.sampled_from(
    ["keys", "fast", "pin", "sizes", "items", "ns", "timeout", "v", "kind", "token", "pid", "model", "layout",
     "salt", "shard", "rel", "id", "other"]), values, max_size=6))
def test_schema_check_accepts_only_well_typed_requests(op, fields):
    msg = {"op": op, **fields}
    try:
        assert protocol.check_request(protocol.decode(msgpack.packb(msg, use_bin_type=True))) == op
    except protocol.ProtocolError:
        return
    # what passes has exactly the op's fields, each of the right type
    assert set(protocol._SCHEMAS[op]) <= set(fields)


def test_well_formed_requests_pass():
    key = bytes(32)
    assert protocol.check_request({"op": "lookup", "keys": [key], "fast": True, "pin": False, "rel": [1]}) == "lookup"
    assert protocol.check_request({"op": "commit", "items": [[1, key, 32, 20480]]}) == "commit"
    with pytest.raises(protocol.ProtocolError, match="missing"):
        protocol.check_request({"op": "get"})
    with pytest.raises(protocol.ProtocolError, match="must be keys"):
        protocol.check_request({"op": "get", "keys": [b"short"]})
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.encode({"op": "get", "keys": [key] * (protocol.MAX_FRAME // 32)})


def test_allocator_coalesces_and_never_double_frees():
    a = ExtentAllocator(1 << 20)
    rnd = random.Random(1)
    held: list[int] = []
    for _ in range(2000):
        if held and rnd.random() < 0.5:
            a.free(held.pop(rnd.randrange(len(held))))
        else:
            off = a.alloc(rnd.choice((4096, 8192, 20480)))
            if off is not None:
                assert off % 4096 == 0
                held.append(off)
    for off in held:
        a.free(off)
    assert a.used == 0 and a.largest_free() == 1 << 20 and a.held() == 0
    off = a.alloc(1 << 20)
    assert off == 0 and a.alloc(1) is None
    a.free(off)
    with pytest.raises(KeyError):
        a.free(off)


def test_addresses():
    assert parse_address("daemon:///run/l.sock").path == "/run/l.sock"
    assert parse_address("/run/l.sock").kind == "unix"
    assert (parse_address("daemon+tcp://127.0.0.1:7070").port) == 7070
    for bad in ("daemon://run/l.sock", "daemon+tcp://host", "redis://x:1", "daemon:relative"):
        with pytest.raises(ConfigError, match="daemon"):
            parse_address(bad)


def test_settings_refuse_what_would_weaken_isolation(tmp_path):
    f = tmp_path / "c.yaml"
    for text, why in (
        ("serve:\n  tenants:\n    - {name: a, token_sha256: %s}\n    - {name: b}\n" % hash_token("x"),
         "every tenant needs a token"),
        ("serve:\n  tenants:\n    - {name: a, token_sha256: plaintext-token}\n", "never the token itself"),
        ("serve:\n  tcp: 0.0.0.0:7070\n", "arena_dir"),
        ("serve:\n  sokcet: /tmp/x\n", "unknown key"),
    ):
        f.write_text(text)
        with pytest.raises(ConfigError, match=why):
            load_settings(f)
    f.write_text("tiers: ['memory://?capacity=1GiB']\nserve:\n  socket: /tmp/x.sock\n")
    assert load_settings(f).socket == "/tmp/x.sock"
    from lmcache_core.config import Config

    assert Config.load(f).tiers == ("memory://?capacity=1GiB",)  # the serve section is the daemon's
