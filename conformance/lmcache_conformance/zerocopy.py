"""The zero-copy check shared by the device and storage suites.

One request is stored through a real engine into N tiers. The check then holds
the engine to the contract:

- one pooled buffer per chunk is allocated, however many tiers there are
  (allocation count), and every tier is handed that same buffer (identity and
  address; a byte store's image view starts at the buffer's address);
- no store changes the image while writing it (content hash before and after);
- after the writes, only tiers that declare ``holds_buffers`` still hold a
  reference, exactly one each; dropping those returns every buffer to the pool;
- no store kept a view of the buffer: after its memory is reused (overwritten
  through the pool), every byte store still returns the ground truth;
- closing the engine leaves no buffer live (no leak).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from . import harness as h
from .groundtruth import EngineKV

if TYPE_CHECKING:
    from lmcache_core.device import Device


def check_fanout(device: "Device", kv: EngineKV, urls: Sequence[str], seed: int = 71) -> dict[str, Any]:
    """Run the zero-copy contract over tiers ``urls``; AssertionError names the first breach."""
    truth = kv.logical()
    sp = h.place(kv, h.NUM_TOKENS, seed=seed)
    tokens = h.tokens_for(seed=seed)
    rec = h.PutRecorder()
    eng = h.make_engine(device, kv, urls)
    try:
        stores = [t.store for t in eng.tiers.tiers]
        assert len(stores) == len(urls), (
            f"only {len(stores)} of {len(urls)} tiers could be created ({[s.name for s in stores]}); see the log")
        for s in stores:
            rec.instrument(s)
        keys = eng.keys(tokens)
        allocs = eng.pool.allocations
        stored = eng.store(tokens, kv.kv, list(sp.block_ids), wait=True)
        assert stored == h.NUM_TOKENS
        assert eng.flush(timeout=60), "queued writes did not finish within 60 s"
        fresh = eng.pool.allocations - allocs
        assert fresh == len(keys), (
            f"storing {len(keys)} chunks into {len(stores)} tiers allocated {fresh} pool buffers; "
            f"expected one per chunk (a tier copied the gathered buffer)")
        names = {s.name for s in stores}
        holders = [s for s in stores if s.capabilities.holds_buffers]
        for i, key in enumerate(keys):
            recs = [r for r in rec.records if r.key == key]
            seen = {r.tier for r in recs}
            assert seen == names, f"chunk {i} was written to {sorted(seen)}, not to every tier {sorted(names)}"
            assert len({r.buffer_id for r in recs}) == 1 and len({r.address for r in recs}) == 1, (
                f"chunk {i} reached the tiers in different buffers: {[(r.tier, hex(r.address)) for r in recs]}")
            for r in recs:
                assert r.digest_before == r.digest_after, f"tier {r.tier} changed the image of chunk {i} while writing it"
                bad = [hex(a) for a in r.image_addresses if a != r.address]
                assert not bad, (f"tier {r.tier} wrote chunk {i} from {bad}, not from the gathered buffer "
                                 f"at {hex(r.address)} (a copy)")
            assert len({r.digest_before for r in recs}) == 1
        live = eng.pool.live_count()
        expected_live = len(keys) if holders else 0
        assert live == expected_live, (
            f"after the writes {live} buffers are live; expected {expected_live} "
            f"(held by {[s.name for s in holders] or 'no tier'}); a tier kept or leaked a reference")
        for s in holders:
            s.delete(keys)
        assert eng.pool.live_count() == 0, (
            f"{eng.pool.live_count()} buffers still live after the buffer-holding tiers dropped them: "
            "a store retained a buffer it does not own")
        h.scribble_idle(eng, kv.kv.geometry.nbytes(h.CHUNK_SIZE) + 4096)
        for s in stores:
            if s.capabilities.holds_buffers:
                continue
            for i, key in enumerate(keys):
                start, end = i * h.CHUNK_SIZE, min((i + 1) * h.CHUNK_SIZE, h.NUM_TOKENS)
                try:
                    c = s.get(key)
                except Exception as exc:  # noqa: BLE001 - a ChunkError here means the store kept a view
                    raise AssertionError(f"tier {s.name}: chunk {i} unreadable after its buffer was reused "
                                         f"({type(exc).__name__}: {exc}); the store kept a view of it") from exc
                assert c is not None, f"tier {s.name} lost chunk {i}"
                try:
                    assert h.chunk_payload_matches(c, truth, sp.slots[start:end]), (
                        f"tier {s.name}: chunk {i} changed after its buffer was reused; the store kept a view of it")
                finally:
                    c.release()
    finally:
        eng.close()
    assert eng.pool.live_count() == 0, f"{eng.pool.live_count()} pool buffers leaked after close"
    return {"tiers": len(urls), "chunks": len(keys), "allocations": fresh}


__all__ = ["check_fanout"]
