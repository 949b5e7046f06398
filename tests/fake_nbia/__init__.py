"""A faithful fake of the NBIA REST API (v1, v2, v4, root "Advanced", token) for tests.

    fake = FakeNBIA(name="nbia")
    with FakeServer(fake) as server:
        httpx.get(f"{server.url}/nbia-api/services/v4/getCollectionValues")

See nbia-api.md for the behaviour it reproduces.
"""

from .app import FakeNBIA
from .routing import LoggedRequest
from .server import FakeServer

__all__ = ["FakeNBIA", "FakeServer", "LoggedRequest"]
