from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from lmcache_core.errors import ConfigError
from lmcache_core.keys import ChunkKey, Namespace, chunk_bounds, chunk_keys

NS = Namespace("llama", "L2-P2-H2-D8-bfloat16", "t", "s")
_SCRIPT = (
    "from lmcache_core.keys import Namespace, chunk_keys;"
    "ns=Namespace('llama','L2-P2-H2-D8-bfloat16','t','s');"
    "print(','.join(k.path for k in chunk_keys(list(range(1000)), ns, 256, algorithm='{alg}')))"
)


@pytest.mark.parametrize("alg", ["xxh3_128", "blake2b"])
def test_keys_identical_across_fresh_processes(alg):
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", _SCRIPT.format(alg=alg)], capture_output=True, text=True,
                             env=env, check=True).stdout.strip()
        outs.add(out)
    here = ",".join(k.path for k in chunk_keys(list(range(1000)), NS, 256, algorithm=alg))
    assert outs == {here}
    assert len(here.split(",")) == 4  # 3 full chunks + 1 partial


def test_prefix_chain_and_namespace():
    a = chunk_keys(list(range(600)), NS, 256)
    b = chunk_keys(list(range(600)), NS, 256)
    assert a == b
    c = chunk_keys(list(range(256)) + [9] * 344, NS, 256)
    assert c[0] == a[0] and c[1] != a[1] and c[2] != a[2]  # same first chunk, then diverge
    other = chunk_keys(list(range(600)), Namespace("llama", NS.layout, "other-tenant"), 256)
    assert all(x != y for x, y in zip(a, other))
    # the tokens after a chunk do not change its key; earlier tokens change every later key
    d = chunk_keys([7] + list(range(1, 600)), NS, 256)
    assert all(x != y for x, y in zip(a, d))


def test_input_types_agree_and_partial():
    import torch

    toks = list(range(300))
    k1 = chunk_keys(toks, NS, 256)
    k2 = chunk_keys(np.array(toks, dtype=np.int32), NS, 256)
    k3 = chunk_keys(torch.tensor(toks), NS, 256)
    assert k1 == k2 == k3
    assert [k.num_tokens for k in k1] == [256, 44]
    assert len(chunk_keys(toks, NS, 256, save_partial=False)) == 1
    assert k1[1] != chunk_keys(list(range(301)), NS, 256)[1]


def test_bounds_and_errors():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(8, 4, save_partial=False) == [(0, 4), (4, 8)]
    with pytest.raises(ConfigError):
        chunk_keys([1, 2], NS, 0)
    with pytest.raises(ConfigError, match="hash_algorithm"):
        chunk_keys([1, 2], NS, 2, algorithm="md5")
    key = chunk_keys([1, 2], NS, 2)[0]
    assert ChunkKey.from_bytes(key.to_bytes()) == key
    assert len(key.path) == 65


# -- key_scheme sglang: SGLang's page hashes ---------------------------------------------------
# Pinned from sglang 0.5.23's own get_hash_str / get_storage_hash_str (its native SHA-256
# extension); tests/integrations/test_sglang_cross_engine.py re-checks random ids live.
_SGL_TOKENS = list(range(100, 110))
_SGL_PLAIN = ["9d373db168e3e6a03e12ea791ce33b00590b4652dd4618889639c8095ac017f7",
              "ba16f22309bf4813eb11f38cd4bbe8797d6020c94bedf8172295626dbe0105a2"]  # 3rd page is partial
_SGL_WIDE = "0b5c96d4fdaea0f217fe4e306dc36c5bcebc9614bfcb3081f452f55ab1481788"  # [1, 2**33, 3, 4]
_SGL_NS = ["52060fdcfd2509c48d35d14d53d696ada0d67dfd45dc92f433ea13ddd7b8e172",
           "7e9deb9f2b708b3f18520985ab053f86bfdc2afc8063e7ca360fc5dde783e114"]  # extra_key lora-7, salt s


def test_sglang_page_hashes_match_pinned_sglang_output():
    from lmcache_core.keys import sglang_page_hashes

    assert sglang_page_hashes(_SGL_TOKENS, 4) == _SGL_PLAIN
    assert sglang_page_hashes(np.array(_SGL_TOKENS, dtype=np.int32), 4) == _SGL_PLAIN
    assert sglang_page_hashes([1, 2**33, 3, 4], 4) == [_SGL_WIDE]
    assert sglang_page_hashes(_SGL_TOKENS, 4, extra_key="lora-7", cache_salt="s") == _SGL_NS
    # a continued chain equals the tail of the whole chain
    assert sglang_page_hashes(_SGL_TOKENS[4:], 4, _SGL_PLAIN[0]) == _SGL_PLAIN[1:]
    assert sglang_page_hashes(_SGL_TOKENS[:3], 4) == []
    with pytest.raises(ValueError):
        sglang_page_hashes([-1, 2, 3, 4], 4)


def test_sglang_chunk_keys_are_page_hash_prefixes():
    from lmcache_core.keys import sglang_chunk_keys, sglang_page_key

    keys = sglang_chunk_keys(_SGL_TOKENS, NS, 4)
    assert [k.digest.hex() for k in keys] == [h[:32] for h in _SGL_PLAIN]
    assert all(k.namespace == NS.id and k.num_tokens == 4 for k in keys)
    assert keys[0] == sglang_page_key(NS.id, _SGL_PLAIN[0], 4)
    assert sglang_page_key(NS.id, "not-hex", 4).digest == sglang_page_key(NS.id, "not-hex", 4).digest


def test_key_scheme_config_and_engine_keys():
    import torch

    from lmcache_core.config import Config
    from lmcache_core.engine import CacheEngine
    from lmcache_core.layout import ChunkGeometry

    cfg = Config.from_dict({"key_scheme": "sglang", "chunk_size": 4, "tiers": ["memory://?capacity=1MiB"],
                            "device": "cpu"})
    assert cfg.save_partial is False  # forced off: SGLang keys whole pages only
    with pytest.raises(ConfigError, match="save_partial"):
        Config.from_dict({"key_scheme": "sglang", "save_partial": True})
    with pytest.raises(ConfigError, match="key_scheme"):
        Config.from_dict({"key_scheme": "vllm"})
    assert Config().key_scheme == "lmcache"
    eng = CacheEngine(ChunkGeometry(2, 2, 8, "float16"), cfg, model="m")
    try:
        keys = eng.keys(torch.tensor(_SGL_TOKENS))
        assert [k.digest.hex() for k in keys] == [h[:32] for h in _SGL_PLAIN]
        assert keys[0].namespace == eng.namespace.id
        lm = CacheEngine(ChunkGeometry(2, 2, 8, "float16"), cfg.replace(key_scheme="lmcache"), model="m")
        assert lm.keys(_SGL_TOKENS)[0] != keys[0] and lm.namespace == eng.namespace
        lm.close()
    finally:
        eng.close()
