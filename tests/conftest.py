"""Shared fixtures: a test CA (trustme) with a ``localhost`` origin certificate, and a real
HTTPS origin server using it (tests/https_server.py), for the end-to-end test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.gateway import Origin


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``ca``: the CA to trust upstream; ``cert``/``key``: the origin's chain and key."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    paths = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    paths["cert"].write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    return paths


@pytest.fixture(scope="session")
def origin(pki: dict[str, Path]) -> Iterator[Origin]:
    with Origin(pki["cert"], pki["key"]) as server:
        yield server
