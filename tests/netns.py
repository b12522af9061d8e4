"""Real gateway topologies in network namespaces made by the test (root only).

The topology itself lives in :mod:`tlsgate.loadtest.topology` (one place for the load-test
suite and the tests); this module adds the pytest marker for machines that cannot build it.
"""

from __future__ import annotations

import pytest

from tlsgate.loadtest.topology import Topology, netns_available

#: The test networks (198.18.0.0/15) are not private ranges, so a gateway's default
#: allow-list (loopback plus the private networks of its interfaces) refuses their clients:
#: tests whose clients connect from another namespace pass this, as an operator would.
ALLOW_TEST_CLIENTS = ("--allow-client", "198.18.0.0/15")


__all__ = ["Topology", "netns_available", "requires_netns"]

requires_netns = pytest.mark.skipif(
    not netns_available(), reason="needs root and iproute2 to create network namespaces"
)
