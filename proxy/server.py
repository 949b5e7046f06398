"""How the gateway is served: uvicorn's options from the settings, the open-file limit, signals.

``nbia-proxy serve`` and the test harness (``tests/gateway_server.py``) build uvicorn's
configuration with :func:`uvicorn_options`, so the tests run what users run.

Shutdown: the first SIGTERM or SIGINT stops accepting connections and lets transfers in flight
go on for ``shutdown_grace_seconds``; then the protocol aborts them (see
:meth:`proxy.hit_protocol.HitProtocol.shutdown`), so a client sees a broken transfer, never a
clean short end. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from proxy.config import Settings
from proxy.protocol_choice import http_protocol

log = logging.getLogger("nbia_proxy.server")

#: After the grace the protocol aborts what is still being sent; handlers then get this long to
#: unwind before uvicorn cancels what is left (requests still waiting for the upstream).
UNWIND_SECONDS = 1.0
#: How long a new worker may take to start serving before uvicorn gives it up.
WORKER_READY_SECONDS = 120
#: After a second signal, the application's own shutdown (closing the upstream clients,
#: flushing the cache writer) may take this long at most.
FORCED_CLEANUP_SECONDS = 2.0


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config`` (all but the app) that serve ``settings``."""
    return {
        # uvicorn's httptools protocol, bounded, plus a shortcut for fresh cache hits (or, when
        # the uvicorn installed lacks what that builds on, uvicorn's own, with a warning).
        "http": http_protocol(),
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
        "timeout_graceful_shutdown": settings.shutdown_grace_seconds + UNWIND_SECONDS,
        # On SIGHUP (logrotate's signal) uvicorn replaces each worker, and gives up the restart,
        # keeping the old worker, when the new one is not ready within this: the old workers
        # would then write the audit log into the rotated file for good. A worker imports the
        # whole gateway and migrates nothing, but on a loaded machine that takes more than
        # uvicorn's 5 s.
        "timeout_worker_healthcheck": WORKER_READY_SECONDS,
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


class Server(uvicorn.Server):
    """uvicorn's server, with a second signal that stops it at once and quietly.

    uvicorn forces an exit only on a second SIGINT, and after any shutdown raises the signals it
    caught again, which ends in a ``KeyboardInterrupt`` and the cancellation tracebacks of the
    requests still running. Here a second SIGINT or SIGTERM forces the exit, and nothing is
    raised again: the process just ends.
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if not self.force_exit:
            return
        # uvicorn skips the application's shutdown on a forced exit; the tasks it leaves would
        # be cancelled by asyncio on the way out, each with a traceback. Cut the connections
        # (a broken transfer for each client), cancel the requests, then let the application
        # close its clients and flush the cache, briefly.
        connections = list(self.server_state.connections)
        for connection in connections:
            connection.transport.abort()
        tasks = list(self.server_state.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FORCED_CLEANUP_SECONDS):
                await self.lifespan.shutdown()
        log.warning(
            "stopped at once by a second signal: %d connections and %d requests cut",
            len(connections),
            len(tasks),
        )


def serve_app(app: Any, settings: Settings) -> None:
    """Serve ``app`` in this process until a signal stops it."""
    server = Server(uvicorn.Config(app, **uvicorn_options(settings)))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the server caught signals
        server.run()
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)  # the reason has been logged
