"""Pointing the tcia-utils client at the gateway.

tcia-utils builds every NBIA URL through ``tcia_utils.nbia.setApiUrl(endpoint, api_url)`` and
has no base-URL setting. :func:`use_gateway` swaps that function for one that returns the same
paths on the gateway (``api_url="nlst"`` goes to the gateway's ``/nlst`` mount)::

    from proxy.tcia import use_gateway
    use_gateway("http://gateway.lab:8080")

Works without tcia-utils installed until it is called.
"""

from __future__ import annotations

from collections.abc import Callable

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


def use_gateway(base_url: str) -> None:
    """Make every tcia-utils NBIA call in this process go through the gateway."""
    from tcia_utils import nbia

    nbia.setApiUrl = gateway_url_builder(base_url)
