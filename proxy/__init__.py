"""nbia-proxy: a local caching gateway for the NBIA REST API."""

__version__ = "0.1.0"
