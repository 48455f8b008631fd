"""Every selected transport against the transport contract."""

from __future__ import annotations

from lmcache_conformance.transport_tests import TransportTests


class TestTransport(TransportTests):
    pass
