"""Contract tests every codec plugin runs: the declared bound holds, lossless is bit-exact, and a
damaged, truncated or mislabelled stream is a miss (``ChunkError``), never other bytes.

Subclass :class:`CodecTests` and supply ``codec_spec`` (a codec name or a chain such as
``lossless+aesgcm``); ``lmcache conformance --codec NAME`` runs it over registered codecs. KV
is the real SmolLM2 sample of a source checkout (benchmarks/data) where present, else smooth
synthetic KV with per-channel scales and outliers (the bound is checked the same way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from .device_tests import ContractTests

_SAMPLE = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "smollm2_kv.npy"
SECRET = b"conformance-secret-0123456789abcdef"


def sample_kv(dtype: str, tokens: int = 64) -> tuple[Any, Any]:
    """``(geometry, kv)`` of ``dtype``: real SmolLM2 KV when the checkout has it."""
    import json

    import numpy as np
    import torch

    from lmcache_core.layout import ChunkGeometry, torch_dtype

    if _SAMPLE.exists():
        meta = json.loads(_SAMPLE.with_suffix(".json").read_text())
        g = ChunkGeometry(meta["num_layers"], meta["num_heads"], meta["head_dim"], dtype)
        raw = torch.from_numpy(np.load(_SAMPLE).view(np.int16)).view(torch.bfloat16)
        kv = raw.reshape(meta["num_layers"], 2, meta["tokens"], -1)[:, :, :tokens].float()
    else:
        g = ChunkGeometry(4, 2, 64, dtype)
        gen = torch.Generator().manual_seed(0)
        scale = torch.rand(4, 2, 1, 128, generator=gen) * 4 + 0.05
        walk = torch.randn(4, 2, tokens, 128, generator=gen).cumsum(2) * 0.1
        kv = (walk + torch.randn(4, 2, 1, 128, generator=gen)) * scale
        kv[:, 0, :, 5] *= 20  # an outlier channel, as real keys have
    return g, kv.to(torch_dtype(dtype)).contiguous()


class CodecTests(ContractTests):
    kind = "codec"
    contract = "codec"

    @pytest.fixture
    def codec_spec(self) -> str:
        pytest.skip("no codec_spec fixture: subclass CodecTests and return a codec name")

    @pytest.fixture
    def pool(self, codec_spec: str) -> Iterator[Any]:
        from lmcache_core.codecs.registry import REGISTRY
        from lmcache_core.memory import BufferPool

        pool = BufferPool()
        chain = REGISTRY.resolve(codec_spec)
        if chain is not None and any(getattr(c, "encrypts", False) for c in chain.codecs):
            from lmcache_core.codecs.aesgcm import bind_secret

            bind_secret(pool, SECRET)
        yield pool

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def chain(spec: str) -> Any:
        from lmcache_core.codecs.registry import REGISTRY
        from lmcache_core.errors import MissingDependencyError

        try:
            chain = REGISTRY.resolve(spec)
        except MissingDependencyError as exc:
            pytest.skip(str(exc))
        assert chain is not None, f"codec {spec!r} resolves to no codec"
        return chain

    @staticmethod
    def coded(pool: Any, chain: Any, g: Any, kv: Any) -> tuple[Any, Any]:
        """``(plain chunk, coded chunk)`` of ``kv`` (caller releases both)."""
        from lmcache_core.chunk import encode_chunk, new_chunk, seal
        from lmcache_core.keys import Namespace, chunk_keys

        n = kv.shape[2]
        key = chunk_keys(list(range(7, 7 + n)), Namespace("conformance", g.signature), n)[0]
        c = new_chunk(pool, key, g, n)
        c.kv().copy_(kv)
        plain = seal(c)
        return plain, encode_chunk(plain, chain, pool)

    @staticmethod
    def image(pool: Any, coded: Any, stored: bytes | None = None, wire: str | None = None) -> tuple[Any, int]:
        """A copy of ``coded``'s image, its coded bytes or codec field replaced, with a *valid* tag."""
        from lmcache_core.chunk import HEADER_SIZE, ChunkBuffer, _write_header

        data = bytes(coded.buf.memoryview(HEADER_SIZE, coded.header.stored_len)) if stored is None else stored
        buf = pool.acquire(HEADER_SIZE + len(data))
        buf.memoryview(HEADER_SIZE, len(data))[:] = data
        out = _write_header(ChunkBuffer(buf, coded.header), wire or coded.header.codec,
                            buf.memoryview(HEADER_SIZE, len(data)), pool)
        return out.buf, out.header.image_len

    def decode(self, pool: Any, buf: Any, n: int, key: Any, g: Any) -> Any:
        from lmcache_core.chunk import decode_image

        return decode_image(buf, n, key, pool, g)

    # -- the contract --------------------------------------------------------------------------
    @pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
    def test_round_trip_within_the_declared_bound(self, codec_spec: str, pool: Any, dtype: str) -> None:
        import torch

        from lmcache_core.codecs import CodecContext

        chain = self.chain(codec_spec)
        g, kv = sample_kv(dtype)
        why = chain.supports(CodecContext(None, g, kv.shape[2]))  # type: ignore[arg-type]
        if why:
            pytest.skip(why)
        plain, coded = self.coded(pool, chain, g, kv)
        assert coded.header.codec == chain.wire_id, "the header must record the chain's wire id"
        buf, n = self.image(pool, coded)
        back = self.decode(pool, buf, n, plain.key, g)
        try:
            if chain.lossless:
                assert torch.equal(back.kv().view(torch.uint8), kv.view(torch.uint8)), \
                    f"codec {codec_spec} declares lossless but changed bytes"
            else:
                x, y = kv.float(), back.kv().float()
                amax = x.abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-30)
                err = float(((x - y).abs() / amax).max())
                assert err <= chain.error_bound, \
                    f"codec {codec_spec}: error {err:.5f} of max|x| exceeds its declared bound {chain.error_bound}"
        finally:
            for c in (plain, coded, back):
                c.release()

    @pytest.mark.parametrize("damage", ["truncate", "garbage", "extend"])
    def test_a_damaged_stream_is_a_miss(self, codec_spec: str, pool: Any, damage: str) -> None:
        import numpy as np

        from lmcache_core.errors import ChunkError

        chain = self.chain(codec_spec)
        g, kv = sample_kv("bfloat16")
        plain, coded = self.coded(pool, chain, g, kv)
        from lmcache_core.chunk import HEADER_SIZE

        data = bytes(coded.buf.memoryview(HEADER_SIZE, coded.header.stored_len))
        if damage == "truncate":
            data = data[: len(data) // 2]
        elif damage == "garbage":
            data = np.random.default_rng(1).integers(0, 256, len(data), dtype=np.uint8).tobytes()
        else:
            data = data + data[:64]
        buf, n = self.image(pool, coded, stored=data)
        try:
            with pytest.raises(ChunkError):
                got = self.decode(pool, buf, n, plain.key, g)
                got.release()
        finally:
            plain.release()
            coded.release()

    def test_a_header_naming_another_codec_is_a_miss(self, codec_spec: str, pool: Any) -> None:
        from lmcache_core.codecs.registry import REGISTRY, BUILTIN
        from lmcache_core.errors import ChunkError

        chain = self.chain(codec_spec)
        g, kv = sample_kv("bfloat16")
        plain, coded = self.coded(pool, chain, g, kv)
        others = [s.wire_id for s in BUILTIN if s.wire_id != chain.wire_id and REGISTRY.known_wire(s.wire_id)]
        others += ["none", "zlib", chain.wire_id.rsplit("/", 1)[0] + "/999"]
        try:
            for wire in others:
                try:
                    buf, n = self.image(pool, coded, wire=wire)
                except ChunkError:
                    continue  # refused already when sealing: fine
                with pytest.raises(ChunkError):
                    got = self.decode(pool, buf, n, plain.key, g)
                    got.release()
                    pytest.fail(f"a {codec_spec} stream labelled {wire!r} decoded")
        finally:
            plain.release()
            coded.release()

    def test_another_chunk_key_does_not_decode_to_this_chunk(self, codec_spec: str, pool: Any) -> None:
        """A coded image copied under another key is refused (the header key, and for encrypting
        codecs the associated data)."""
        from lmcache_core.errors import ChunkError
        from lmcache_core.keys import Namespace, chunk_keys

        chain = self.chain(codec_spec)
        g, kv = sample_kv("bfloat16")
        plain, coded = self.coded(pool, chain, g, kv)
        other = chunk_keys(list(range(99, 99 + kv.shape[2])), Namespace("conformance", g.signature), kv.shape[2])[0]
        buf, n = self.image(pool, coded)
        try:
            with pytest.raises(ChunkError):
                got = self.decode(pool, buf, n, other, g)
                got.release()
        finally:
            plain.release()
            coded.release()


__all__ = ["CodecTests", "sample_kv"]
