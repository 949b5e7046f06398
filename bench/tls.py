"""TLS relay benchmark: the binary client over HTTPS, per request set-up and bulk throughput.

Run on purpose (not part of the test suite)::

    .venv/bin/python -m bench.tls --small 200 --large-mb 256 --rounds 3

It starts a local HTTPS server in its own process (a certificate from a throw-away CA made
with ``trustme``) that answers ``GET /bytes/<n>`` with ``n`` bytes and a Content-Length, and
keeps connections alive unless asked not to. Then, under uvloop as in the gateway, each client
variant fetches ``--small`` bodies of ``--small-kb`` one after the other (the cost of setting up a
request: TLS context, connection, handshake) and one body of ``--large-mb`` (throughput), the
variants interleaved round by round so that machine noise hits them alike:

* ``new-context``: :func:`proxy.rawhttp.send` as it was, a new default SSL context (the system
  trust store loaded again) and a new connection per request;
* ``one-context``: the same, with one SSL context built beforehand;
* ``client``: a :class:`proxy.rawhttp.Client` (one context, idle connections reused);
* ``aiohttp``: an ``aiohttp.ClientSession`` on one context (when aiohttp is installed).

Printed per variant: the median over rounds of wall time and of this process's CPU time per
small request, and MB/s for the large body, with ratios to ``new-context`` from this run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from bench import common
from proxy import rawhttp

CHUNK = b"\x5a" * (1024 * 1024)


async def _serve(port: int, chain: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(chain)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                size = int(head.split(b" ", 2)[1].rsplit(b"/", 1)[1])
                close = b"connection: close" in head.lower()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n" % size)
                writer.write(b"connection: close\r\n\r\n" if close else b"\r\n")
                view = memoryview(CHUNK)
                while size > 0:
                    writer.write(view[: min(size, len(CHUNK))])
                    size -= len(CHUNK)
                    await writer.drain()
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=context)
    async with server:
        await server.serve_forever()


def serve(port: int, chain: str) -> None:
    """The HTTPS server, in its own process."""
    import uvloop

    uvloop.run(_serve(port, chain))


Fetch = Callable[[httpx.URL], Awaitable[int]]


async def _drain(response: Any) -> int:
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
    await response.aclose()
    return size


def variants(ca_file: str) -> dict[str, tuple[Fetch, Callable[[], Awaitable[None]]]]:
    """Each client variant: a fetch function and its clean-up."""
    timeouts = {"connect_timeout": 10.0, "read_timeout": 30.0}
    headers = [(b"accept", b"*/*")]

    def trusting(context: ssl.SSLContext) -> ssl.SSLContext:
        context.load_verify_locations(ca_file)
        return context

    shared = trusting(ssl.create_default_context())

    async def new_context(url: httpx.URL) -> int:
        context = trusting(ssl.create_default_context())  # as rawhttp.send did per request
        response = await rawhttp.send(url, "GET", headers, b"", ssl_context=context, **timeouts)
        return await _drain(response)

    async def one_context(url: httpx.URL) -> int:
        response = await rawhttp.send(url, "GET", headers, b"", ssl_context=shared, **timeouts)
        return await _drain(response)

    async def nothing() -> None:
        pass

    found: dict[str, tuple[Fetch, Callable[[], Awaitable[None]]]] = {
        "new-context": (new_context, nothing),
        "one-context": (one_context, nothing),
    }
    client_class = getattr(rawhttp, "Client", None)
    if client_class is not None:
        client = client_class(trusting(ssl.create_default_context()))

        async def pooled(url: httpx.URL) -> int:
            response = await client.send(url, "GET", headers, b"", **timeouts)
            return await _drain(response)

        found["client"] = (pooled, client.aclose)
    try:
        import aiohttp
    except ImportError:
        print("aiohttp is not installed: no aiohttp row")
        return found
    session: aiohttp.ClientSession | None = None

    async def with_aiohttp(url: httpx.URL) -> int:
        nonlocal session
        if session is None:
            connector = aiohttp.TCPConnector(ssl=trusting(ssl.create_default_context()))
            session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        size = 0
        async with session.get(str(url), headers={"accept": "*/*"}) as response:
            async for chunk in response.content.iter_any():
                size += len(chunk)
        return size

    async def close_session() -> None:
        if session is not None:
            await session.close()

    found["aiohttp"] = (with_aiohttp, close_session)
    return found


async def measure(args: argparse.Namespace, base: str, ca_file: str) -> None:
    clients = variants(ca_file)
    small_url = httpx.URL(f"{base}/bytes/{args.small_kb * 1024}")
    large_url = httpx.URL(f"{base}/bytes/{args.large_mb * 1024 * 1024}")
    wall: dict[str, list[float]] = {name: [] for name in clients}
    cpu: dict[str, list[float]] = {name: [] for name in clients}
    speed: dict[str, list[float]] = {name: [] for name in clients}
    for fetch, _ in clients.values():  # warm up: imports, first handshakes
        await fetch(small_url)
    for _ in range(args.rounds):
        for name, (fetch, _) in clients.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            for _ in range(args.small):
                assert await fetch(small_url) == args.small_kb * 1024
            wall[name].append((time.perf_counter() - started) / args.small * 1000)
            cpu[name].append((time.process_time() - cpu_started) / args.small * 1000)
            started = time.perf_counter()
            assert await fetch(large_url) == args.large_mb * 1024 * 1024
            speed[name].append(args.large_mb * 1024 * 1024 / 1e6 / (time.perf_counter() - started))
    for _, close in clients.values():
        await close()

    print(
        f"\n{args.small} x {args.small_kb} KB and 1 x {args.large_mb} MB over HTTPS (loopback),"
        f" {args.rounds} rounds, medians; ratios against new-context"
    )
    print(f"{'variant':12s} {'ms/request':>10s} {'CPU ms/req':>10s} {'MB/s':>7s}   ratios")
    base_wall = statistics.median(wall["new-context"])
    base_cpu = statistics.median(cpu["new-context"])
    base_speed = statistics.median(speed["new-context"])
    for name in clients:
        w, c, s = (statistics.median(v[name]) for v in (wall, cpu, speed))
        print(
            f"{name:12s} {w:10.2f} {c:10.2f} {s:7.0f}   "
            f"time x{w / base_wall:.2f}  CPU x{c / base_cpu:.2f}  MB/s x{s / base_speed:.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200, help="small requests per round")
    parser.add_argument("--small-kb", type=int, default=16, help="size of a small body")
    parser.add_argument("--large-mb", type=int, default=256, help="size of the large body")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "CHAIN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), args.serve[1])
        return 0
    import trustme
    import uvloop

    with tempfile.TemporaryDirectory() as tmpdir:
        ca = trustme.CA()
        ca_file, chain = str(Path(tmpdir, "ca.pem")), str(Path(tmpdir, "server.pem"))
        ca.cert_pem.write_to_path(ca_file)
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(chain)
        port = common.free_port()
        server = common.launch(
            [sys.executable, "-m", "bench.tls", "--serve", str(port), chain],
            stdout=subprocess.DEVNULL,
        )
        try:
            common.wait_for_port(port, timeout=30, process=server)
            uvloop.run(measure(args, f"https://127.0.0.1:{port}", ca_file))
        finally:
            common.stop_processes([server])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
