"""The codec contract (lmcache_conformance.CodecTests) catches deliberately broken codecs, and a
vendor's test file is a few lines."""
from __future__ import annotations

import numpy as np
import pytest

from lmcache_conformance.codec_tests import CodecTests
from lmcache_core.codecs import Codec
from lmcache_core.codecs.registry import REGISTRY, CodecSpec
from lmcache_core.memory import BufferPool


class Drops(Codec):
    """Claims lossless, clears the lowest bit of every byte."""

    name, wire_id, lossless = "broken-drops", "broken-drops/1", True

    def encode(self, data, ctx):
        return (np.frombuffer(data, np.uint8) & 0xFE).tobytes()

    def decode(self, data, limit, ctx):
        return bytes(data)


class Loose(Codec):
    """Lossy with a bound it does not keep (4-bit values, declares 1%)."""

    name, wire_id, lossless, error_bound = "broken-loose", "broken-loose/1", False, 0.01
    dtypes = ("bfloat16", "float16", "float32")

    def encode(self, data, ctx):
        return (np.frombuffer(data, np.uint8) & 0xF0).tobytes()

    def decode(self, data, limit, ctx):
        return bytes(data)


class Trusting(Codec):
    """Exact, but decodes whatever it is given (no length or integrity check of its own)."""

    name, wire_id, lossless = "broken-trusting", "broken-trusting/1", True

    def encode(self, data, ctx):
        return bytes(data)

    def decode(self, data, limit, ctx):
        return bytes(data[:limit]).ljust(limit, b"\0")


for cls in (Drops, Loose, Trusting):
    REGISTRY.register(CodecSpec(cls.name, f"{__name__}:{cls.__name__}", cls.wire_id, distribution="tests"))


class TestBuiltinLossless(CodecTests):
    """How a vendor runs the contract: one fixture."""

    @pytest.fixture
    def codec_spec(self) -> str:
        return "lossless"



@pytest.mark.parametrize("spec", ["broken-drops", "broken-loose"])
def test_the_contract_catches_a_codec_that_breaks_its_bound(spec):
    with pytest.raises(AssertionError, match="lossless but changed bytes|exceeds its declared bound"):
        CodecTests().test_round_trip_within_the_declared_bound(spec, BufferPool(), "bfloat16")


def test_the_contract_catches_a_codec_that_decodes_damage():
    # a truncated stream is padded and "decodes": the contract wants a miss
    with pytest.raises(BaseException, match="DID NOT RAISE"):
        CodecTests().test_a_damaged_stream_is_a_miss("broken-trusting", BufferPool(), "truncate")
