from __future__ import annotations

import pytest
import torch

from lmcache_core import CacheEngine, ChunkGeometry, Config


@pytest.fixture
def make_engine(tmp_path):
    """Build engines on memory + disk tiers under tmp_path; all closed at teardown."""
    engines: list[CacheEngine] = []

    def make(geometry: ChunkGeometry, tiers: list[str] | None = None, **overrides) -> CacheEngine:
        cfg = Config.from_dict({
            "tiers": tiers or ["memory://?capacity=256MiB", f"disk://{tmp_path / 'disk'}?capacity=256MiB"],
            "chunk_size": overrides.pop("chunk_size", 32),
            "device": "cpu",
            **overrides,
        })
        eng = CacheEngine(geometry, cfg, model=overrides.get("model", "test-model"))
        engines.append(eng)
        return eng

    yield make
    for e in engines:
        e.close()


def random_kv(shape, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random, never-zero KV of any dtype (fp8 built from random bytes without NaNs)."""
    g = torch.Generator().manual_seed(seed)
    if dtype.itemsize == 1:
        raw = torch.randint(1, 0x70, shape, dtype=torch.uint8, generator=g)
        sign = torch.randint(0, 2, shape, dtype=torch.uint8, generator=g) * 0x80
        return (raw | sign).view(dtype)
    return (torch.randn(shape, generator=g) + 0.5).to(dtype)
