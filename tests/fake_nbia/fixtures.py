"""pytest fixtures: session-scoped fake servers, reset before each test.

Load with `pytest_plugins = ["tests.fake_nbia.fixtures"]` in the root conftest.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .app import FakeNBIA
from .server import FakeServer


@pytest.fixture(scope="session")
def fake_nbia() -> Iterator[FakeServer]:
    """The main archive ('nbia'), one server for the whole session."""
    server = FakeServer(FakeNBIA(name="nbia"))
    with server:
        yield server
    server.app.images.cleanup()


@pytest.fixture(scope="session")
def fake_nlst() -> Iterator[FakeServer]:
    """The NLST archive ('nlst'), one server for the whole session."""
    server = FakeServer(FakeNBIA(name="nlst"))
    with server:
        yield server
    server.app.images.cleanup()


def _fresh(server: FakeServer) -> FakeServer:
    server.start()  # a previous test may have left it stopped
    server.app.reset()
    return server


@pytest.fixture
def nbia_upstream(fake_nbia: FakeServer) -> Iterator[FakeServer]:
    """The 'nbia' fake, reset (log, faults, tokens, counters) and running."""
    yield _fresh(fake_nbia)


@pytest.fixture
def nlst_upstream(fake_nlst: FakeServer) -> Iterator[FakeServer]:
    """The 'nlst' fake, reset and running."""
    yield _fresh(fake_nlst)
