"""Every selected transport against the transport contract."""

from __future__ import annotations

from lmcache_conformance.transport_tests import TransportProcessTests, TransportTests


class TestTransport(TransportTests):
    pass


class TestTransportProcesses(TransportProcessTests):
    pass
