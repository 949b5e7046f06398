"""How the gateway is served: uvicorn's options from the settings, the open-file limit.

``nbia-proxy serve`` and the test harness (``tests/gateway_server.py``) build uvicorn's
configuration with :func:`uvicorn_options`, so the tests run what users run.
"""

from __future__ import annotations

import contextlib
import logging
import resource
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from proxy.config import Settings

log = logging.getLogger("nbia_proxy.server")


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config`` (all but the app) that serve ``settings``."""
    return {
        # uvicorn's httptools protocol, bounded, plus a shortcut for fresh cache hits.
        "http": "proxy.hit_protocol:HitProtocol",
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "log_config": None,
        # The upstream's own Date and Server headers are relayed instead.
        "server_header": False,
        "date_header": False,
        "access_log": False,
        # uvicorn believes X-Forwarded-For from 127.0.0.1 by default: any local caller could
        # then choose the address that is audited and locked out. Only listed proxies count.
        "proxy_headers": bool(settings.trusted_proxies),
        "forwarded_allow_ips": list(settings.trusted_proxies),
    }


def raise_file_limit() -> None:
    """Raise the soft open-file limit to the hard one: each connection holds a descriptor, and
    the usual soft limit (1024) is reached by a thousand idle clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.info("open-file limit stays at %d (raising it to %d failed: %s)", soft, hard, exc)
        return
    log.info("open-file limit raised from %d to %d", soft, hard)


def serve_app(app: Any, settings: Settings) -> None:
    """Serve ``app`` in this process until a signal stops it."""
    server = uvicorn.Server(uvicorn.Config(app, **uvicorn_options(settings)))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the server caught signals
        server.run()
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)  # the reason has been logged
