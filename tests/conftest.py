"""Shared fixtures: the fake NBIA upstreams and a gateway in front of them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, make_settings

pytest_plugins = ["tests.fake_nbia.fixtures"]


@pytest.fixture
def gateway(
    tmp_path: Path, nbia_upstream: FakeServer, nlst_upstream: FakeServer
) -> Iterator[GatewayServer]:
    """A gateway on a real socket, in front of both fake upstreams, with default settings."""
    with GatewayServer(make_settings(tmp_path, nbia_upstream.url, nlst_upstream.url)) as server:
        yield server
