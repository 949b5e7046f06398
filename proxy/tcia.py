"""Pointing the tcia-utils client at the gateway.

tcia-utils builds every NBIA URL through ``tcia_utils.nbia.setApiUrl(endpoint, api_url)`` and
has no base-URL setting. :func:`use_gateway` swaps that function for one that returns the same
paths on the gateway (``api_url="nlst"`` goes to the gateway's ``/nlst`` mount)::

    from proxy.tcia import use_gateway
    use_gateway("http://gateway.lab:8080")
    use_gateway("http://gateway.lab:8080", user="alice", api_key=key)  # accounts mode

Works without tcia-utils installed until it is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_VALID_API_URLS = ("nbia", "nlst")


def gateway_url_builder(base_url: str) -> Callable[..., str]:
    """A drop-in ``setApiUrl`` that targets the gateway at ``base_url``."""
    base = base_url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"gateway URL must start with http:// or https://, got {base_url!r}")

    def set_api_url(endpoint: str, api_url: str = "nbia") -> str:
        api_url = api_url or "nbia"
        if api_url not in _VALID_API_URLS:
            # Same check and message as tcia-utils, so callers see no difference.
            raise ValueError(
                f"Invalid api_url '{api_url}'. Must be one of: {list(_VALID_API_URLS)}"
            )
        mount = "/nlst" if api_url == "nlst" else ""
        # tcia-utils keeps getContentsByName (shared carts) on v1; everything else is v4.
        version = "v1" if endpoint == "getContentsByName" else "v4"
        return f"{base}{mount}/nbia-api/services/{version}/"

    return set_api_url


class _WithCredentials:
    """Stands in for the ``requests`` module inside ``tcia_utils.nbia``: every ``get`` and
    ``post`` carries the lab credential (HTTP Basic, the API key as password)."""

    def __init__(self, module: Any, auth: tuple[str, str]) -> None:
        self._module = module
        self._auth = auth

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("auth", self._auth)
        return self._module.get(*args, **kwargs)

    def post(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("auth", self._auth)
        return self._module.post(*args, **kwargs)


def use_gateway(base_url: str, user: str | None = None, api_key: str | None = None) -> None:
    """Make every tcia-utils NBIA call in this process go through the gateway, as the lab
    ``user`` with ``api_key`` when the gateway runs in accounts mode."""
    import requests
    from tcia_utils import nbia

    nbia.setApiUrl = gateway_url_builder(base_url)
    if user is not None and api_key is not None:
        nbia.requests = _WithCredentials(requests, (user, api_key))
    else:
        nbia.requests = requests
