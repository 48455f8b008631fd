"""The fast key path against a plain implementation of the chain as first written.

Keys are persisted (disk, Redis, S3) and shared with other engines, so every digest the
fast path makes must be byte-identical to this reference, for every chunk count, both
algorithms, every kind of extras and every input type.
"""

from __future__ import annotations

import hashlib
import pickle
import random

import numpy as np
import pytest
import xxhash

from lmcache_core.errors import ConfigError
from lmcache_core.keys import (HASH_BYTES, ChunkKey, KeyExtras, MMItem, Namespace, PrefixKeys, chunk_keys,
                               token_bytes)

NS = Namespace("llama", "L2-P2-H2-D8-bfloat16", "t", "s")


def reference_chunk_keys(tokens, namespace, chunk_size=256, *, save_partial=True, algorithm="xxh3_128",
                         extras=None):
    """The chain, one hasher object per chunk and one update per field (the 2026-11 code)."""
    arr = np.ascontiguousarray(np.asarray(tokens).reshape(-1), dtype="<i8")
    ns = namespace.id
    prev = (extras.seed if extras else b"") or b"\x00" * HASH_BYTES
    out = []
    n = arr.size
    end_full = n - n % chunk_size
    bounds = [(s, s + chunk_size) for s in range(0, end_full, chunk_size)]
    if save_partial and end_full < n:
        bounds.append((end_full, n))
    for start, end in bounds:
        h = xxhash.xxh3_128() if algorithm == "xxh3_128" else hashlib.blake2b(digest_size=HASH_BYTES)
        h.update(prev)
        h.update(ns)
        h.update(arr[start:end].tobytes())
        if extras and (extras.mm or extras.embeds):
            h.update(extras.chunk_bytes(start, end, chunk_size))
        prev = h.digest()
        out.append((ns, prev, end - start))
    return out


def _triples(keys):
    return [(k.namespace, k.digest, k.num_tokens) for k in keys]


def _extras(kind: str, n: int, chunk: int, rng: random.Random) -> KeyExtras | None:
    if kind == "none":
        return None
    if kind == "seed":
        return KeyExtras(adapter=("lora-a", "/p"), cache_salt="salt", extra_key="x")
    if kind == "mm":
        items = tuple(MMItem(f"img{i}", rng.randrange(max(n, 1)), rng.randrange(1, 3 * chunk)) for i in range(3))
        return KeyExtras(cache_salt="s" if rng.random() < 0.5 else "", mm=items)
    # prompt embeddings: one digest per chunk
    digests = tuple(hashlib.blake2b(bytes([i % 256]) * 7, digest_size=16).digest()
                    for i in range(-(-n // chunk)))
    return KeyExtras(embeds=digests, embeds_chunk=chunk, embeds_tokens=n)


def _counts(chunk: int, rng: random.Random) -> list[int]:
    fixed = [0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk, 5 * chunk + 3]
    return fixed + [rng.randrange(0, 12 * chunk) for _ in range(6)]


@pytest.mark.parametrize("algorithm", ["xxh3_128", "blake2b"])
@pytest.mark.parametrize("kind", ["none", "seed", "mm", "embeds"])
@pytest.mark.parametrize("chunk", [1, 16, 256])
def test_fast_keys_equal_reference(algorithm, kind, chunk):
    rng = random.Random(f"{algorithm}-{kind}-{chunk}")
    for n in _counts(chunk, rng):
        toks = [rng.randrange(0, 1 << 31) for _ in range(n)]
        extras = _extras(kind, n, chunk, rng)
        for save_partial in (True, False):
            want = reference_chunk_keys(toks, NS, chunk, save_partial=save_partial, algorithm=algorithm,
                                        extras=extras)
            for given in (toks, tuple(toks), np.array(toks, dtype=np.int64), np.array(toks, dtype=np.int32)):
                got = chunk_keys(given, NS, chunk, save_partial=save_partial, algorithm=algorithm, extras=extras)
                assert _triples(got) == want, (n, type(given), save_partial)


def test_fast_keys_torch_and_odd_inputs():
    import torch

    rng = random.Random(1)
    toks = [rng.randrange(0, 1 << 40) for _ in range(700)]  # wide ids (past int32)
    want = reference_chunk_keys(toks, NS, 256)
    assert _triples(chunk_keys(torch.tensor(toks), NS, 256)) == want
    assert _triples(chunk_keys(torch.tensor(toks).view(7, 100), NS, 256)) == want
    assert _triples(chunk_keys(np.array(toks)[::-1][::-1], NS, 256)) == want
    assert _triples(chunk_keys(np.array(toks, dtype=">i8"), NS, 256)) == want
    assert _triples(chunk_keys(np.array(toks, dtype=np.int64)[:, None], NS, 256)) == want
    neg = [-1, -(1 << 62), 5] * 100
    assert _triples(chunk_keys(neg, NS, 256)) == reference_chunk_keys(neg, NS, 256)
    assert _triples(chunk_keys([np.int64(t) for t in toks], NS, 256)) == want
    assert chunk_keys([], NS, 256) == [] and chunk_keys(np.zeros(0, np.int64), NS, 256) == []
    assert token_bytes(toks).dtype == np.dtype("<i8")


def test_fast_keys_are_ordinary_keys():
    key = chunk_keys(list(range(300)), NS, 256)[1]
    assert type(key) is ChunkKey and key.num_tokens == 44
    assert key == ChunkKey(key.namespace, key.digest, 44) and hash(key) == hash(ChunkKey(key.namespace, key.digest, 0))
    assert pickle.loads(pickle.dumps(key)) == key
    assert key.id == key.to_bytes() == ChunkKey(key.namespace, key.digest, 0).id
    assert pickle.loads(pickle.dumps(key)).id == key.id
    assert ChunkKey.from_bytes(key.to_bytes(), 44) == key
    with pytest.raises(ValueError):
        ChunkKey(b"short", key.digest, 1)  # external construction is still validated
    with pytest.raises(AttributeError):
        key.digest = b"x" * 16  # type: ignore[misc]


@pytest.mark.parametrize("algorithm", ["xxh3_128", "blake2b"])
@pytest.mark.parametrize("kind", ["none", "seed", "mm"])
def test_prefix_keys_grow_and_diverge(algorithm, kind):
    rng = random.Random(f"prefix-{algorithm}-{kind}")
    chunk = 16
    final = [rng.randrange(0, 50000) for _ in range(20 * chunk + 5)]
    extras = _extras(kind, len(final), chunk, rng)
    cache = PrefixKeys(NS, chunk, algorithm=algorithm, extras=extras)
    appended = PrefixKeys(NS, chunk, algorithm=algorithm, extras=extras)
    growing: list[int] = []
    step = 0
    while len(growing) < len(final):
        new = final[len(growing): len(growing) + rng.randrange(1, 3 * chunk)]
        growing.extend(new)  # one list, appended to (vLLM's request tokens)
        want = reference_chunk_keys(growing, NS, chunk, algorithm=algorithm, extras=extras)
        assert _triples(cache.keys(growing)) == want
        assert _triples(appended.extend(np.array(new) if step % 2 else new)) == want
        if step % 3 == 2:  # an array, then the list again (compared by value, not by object)
            assert _triples(cache.keys(np.array(growing))) == want
            assert _triples(cache.keys(growing)) == want
        step += 1
    assert cache.reused_chunks > 0 and appended.reused_chunks > 0
    assert _triples(appended.extend([])) == _triples(cache.keys(final))
    # an edit in the middle, a shorter list, an unrelated list: recomputed from the change
    edited = list(final)
    edited[5 * chunk + 3] += 1
    for given in (edited, final[: 7 * chunk], final[: 3], [], final[::-1], final):
        want = reference_chunk_keys(given, NS, chunk, algorithm=algorithm, extras=extras)
        assert _triples(cache.keys(given)) == want
        assert _triples(cache.keys(list(given))) == want  # a copy, not the same list object
    no_partial = PrefixKeys(NS, chunk, save_partial=False, algorithm=algorithm, extras=extras)
    for n in (0, 5, chunk, 3 * chunk + 1, len(final)):
        assert _triples(no_partial.keys(final[:n])) == reference_chunk_keys(
            final[:n], NS, chunk, save_partial=False, algorithm=algorithm, extras=extras)


def test_prefix_keys_list_mutated_in_place():
    chunk = 8
    toks = list(range(10 * chunk))
    cache = PrefixKeys(NS, chunk)
    assert _triples(cache.keys(toks)) == reference_chunk_keys(toks, NS, chunk)
    toks[3] = 999  # same list object, an earlier token changed
    assert _triples(cache.keys(toks)) == reference_chunk_keys(toks, NS, chunk)
    toks[-1] = 7
    toks.append(1)
    assert _triples(cache.keys(toks)) == reference_chunk_keys(toks, NS, chunk)
    arr = np.array(toks, dtype=np.int64)
    assert _triples(cache.keys(arr)) == reference_chunk_keys(toks, NS, chunk)
    arr[0] = 5  # the caller's array changed in place: the cache kept its own copy
    assert _triples(cache.keys(arr)) == reference_chunk_keys(arr, NS, chunk)
    with pytest.raises(ConfigError):
        PrefixKeys(NS, chunk, algorithm="md5")


# -- the tier stack's lookup against the plain per-key version --------------------------------
def reference_lookup(stack, keys, fast_only=False):
    """TierStack.lookup as first written: one loop per tier over the keys still missing."""
    where = [None] * len(keys)
    missing = list(range(len(keys)))
    for tier in stack.tiers:
        if fast_only and not tier.fast:
            continue
        if not missing:
            break
        present = tier.store.exists([keys[i] for i in missing])
        still = []
        for i, ok in zip(missing, present):
            if ok:
                where[i] = tier.name
            else:
                still.append(i)
        missing = still
    hits = 0
    for w in where:
        if w is None:
            break
        hits += 1
    return hits, tuple(where[:hits])


def test_tier_lookup_equals_reference():
    from lmcache_core.memory import BufferPool
    from lmcache_core.metrics import Metrics
    from lmcache_core.storage import Store, StoreCapabilities, StoreContext
    from lmcache_core.tiers import TierStack

    class Scripted(Store):
        """Holds a set of keys; answers ``exists`` as a list, a tuple, a generator or short."""

        capabilities = StoreCapabilities(holds_buffers=False)

        def __init__(self, name, fast, held, style):
            super().__init__(name, StoreContext(BufferPool()))
            self.held, self.style, self.asked = held, style, []
            if fast:
                self.capabilities = StoreCapabilities(holds_buffers=True)

        @classmethod
        def from_url(cls, url, context):
            raise NotImplementedError

        def put(self, key, chunk):
            return False

        def get(self, key):
            return None

        def delete(self, keys):
            return 0

        def exists(self, keys):
            self.asked.append(list(keys))
            flags = [k in self.held for k in keys]
            if self.style == "short":
                return flags[: len(flags) // 2]
            if self.style == "ints":
                return tuple(int(f) for f in flags)
            if self.style == "gen":
                return (f for f in flags)
            return flags

    rng = random.Random(7)
    keys = chunk_keys(list(range(40 * 4)), NS, 4)
    for trial in range(300):
        n = rng.choice([0, 1, 2, 5, 40])
        ks = keys[:n]
        specs = []
        for t in range(rng.randrange(1, 4)):
            mode = rng.choice(["all", "none", "prefix", "random"])
            cut = rng.randrange(0, n + 1)
            held = set(ks if mode == "all" else () if mode == "none" else ks[:cut] if mode == "prefix"
                       else [k for k in ks if rng.random() < 0.6])
            style = rng.choice(["list", "list", "ints", "gen", "short"])
            specs.append((f"t{t}", t == 0 or rng.random() < 0.3, held, style))
        for fast_only in (False, True):
            fast = [Scripted(*s) for s in specs]
            ref = [Scripted(*s) for s in specs]
            stack = TierStack(fast, Metrics())
            ref_stack = TierStack(ref, Metrics())
            try:
                got = stack.lookup(ks, fast_only=fast_only)
                assert (got.hits, got.tiers) == reference_lookup(ref_stack, ks, fast_only), (trial, specs)
                assert [s.asked for s in fast] == [s.asked for s in ref]  # the same questions to every store
            finally:
                stack.close()
                ref_stack.close()


def test_prefix_keys_after_a_refused_input():
    chunk = 4
    toks = list(range(6 * chunk))
    cache = PrefixKeys(NS, chunk)
    cache.keys(toks)
    bad = toks + [None]
    with pytest.raises(TypeError):
        cache.keys(bad)  # the tail does not convert: nothing is kept from it
    toks.append(3)
    assert _triples(cache.keys(toks)) == reference_chunk_keys(toks, NS, chunk)
    extras = KeyExtras(embeds=(b"d" * 16,), embeds_chunk=chunk, embeds_tokens=chunk)
    cache = PrefixKeys(NS, chunk, extras=extras)
    assert _triples(cache.keys(toks[:chunk])) == reference_chunk_keys(toks[:chunk], NS, chunk, extras=extras)
    with pytest.raises(ValueError):
        cache.keys(toks)  # past the embedding digests: refused as chunk_keys refuses it
    assert _triples(cache.keys(toks[:chunk])) == reference_chunk_keys(toks[:chunk], NS, chunk, extras=extras)
