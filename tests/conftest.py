"""Shared fixtures: the fake NBIA upstreams and gateways in front of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayFactory, GatewayServer, make_settings

pytest_plugins = ["tests.fake_nbia.fixtures"]


@pytest.fixture
def make_gateway(
    tmp_path: Path, nbia_upstream: FakeServer, nlst_upstream: FakeServer
) -> GatewayFactory:
    """Build gateways on this test's data dir, in front of both fake upstreams.

    Keyword arguments are settings (``make_settings``); ``upstream`` replaces the 'nbia' fake,
    ``clock`` and ``cache_clock`` are the app's clocks. A module whose gateways all want the
    same extras overrides this fixture with a ``functools.partial`` of it.
    """

    def build(
        upstream: str | None = None,
        *,
        clock: Callable[[], float] | None = None,
        cache_clock: Callable[[], float] | None = None,
        **settings: Any,
    ) -> GatewayServer:
        seams = {"clock": clock, "cache_clock": cache_clock}
        return GatewayServer(
            make_settings(tmp_path, upstream or nbia_upstream.url, nlst_upstream.url, **settings),
            **{name: seam for name, seam in seams.items() if seam is not None},
        )

    return build


@pytest.fixture
def gateway(make_gateway: GatewayFactory) -> Iterator[GatewayServer]:
    """A running gateway from ``make_gateway()``: default settings, unless the module
    overrides ``make_gateway``."""
    with make_gateway() as server:
        yield server


@pytest.fixture
def gw(gateway: GatewayServer) -> GatewayServer:
    """The same gateway, by the short name most modules use."""
    return gateway
