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
