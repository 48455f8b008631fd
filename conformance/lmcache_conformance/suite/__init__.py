"""The test modules `lmcache conformance` runs: concrete subclasses of the contract classes,
their fixtures supplied by :mod:`lmcache_conformance.pytest_plugin` from the plugin registry."""
