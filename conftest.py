"""Repository-wide pytest setup: real storage servers as fixtures (see lmcache_core/testing/fixtures.py)."""

pytest_plugins = ["lmcache_core.testing.fixtures"]
