"""Test helpers shared by the plugin test suites and the conformance suite.

- :mod:`lmcache_core.testing.servers`: real Redis, Valkey and SeaweedFS S3 servers on loopback.
- :mod:`lmcache_core.testing.fixtures`: a pytest plugin with those servers as fixtures.
- :mod:`lmcache_core.testing.storage_tests`: ``StoreTests`` and the Hypothesis state machine.

Importing this package imports nothing heavy; pytest and hypothesis load with the submodules.
"""
