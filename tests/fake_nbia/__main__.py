"""Run a fake NBIA in the foreground (for benchmarks).

    python -m tests.fake_nbia --host 127.0.0.1 --port 9000 --big-zip-mb 1024

Prints `url=...` and `big_series_uid=...` (one key=value per line) once it listens.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys

import uvicorn

from .app import FakeNBIA


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_nbia", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--name", default="nbia", choices=("nbia", "nlst"))
    parser.add_argument(
        "--big-zip-mb",
        type=float,
        default=4.0,
        help="approximate size of the big series' zip, in MiB",
    )
    parser.add_argument(
        "--bulk-series", type=int, default=0, help="series in the Bulk-CT collection (benchmarks)"
    )
    parser.add_argument(
        "--bulk-series-mb", type=float, default=20.0, help="approximate zip size of each, in MiB"
    )
    args = parser.parse_args(argv)

    fake = FakeNBIA(
        args.name,
        big_zip_bytes=int(args.big_zip_mb * 1024 * 1024),
        bulk_series=args.bulk_series,
        bulk_series_bytes=int(args.bulk_series_mb * 1024 * 1024),
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    port = sock.getsockname()[1]
    print(f"url=http://{args.host}:{port}", flush=True)
    print(f"big_series_uid={fake.big_series_uid}", flush=True)
    print(f"big_zip_bytes={fake.images.big_zip_bytes}", flush=True)
    config = uvicorn.Config(
        fake, lifespan="off", log_level="warning", access_log=False, server_header=False
    )
    # uvicorn re-raises SIGTERM after its graceful shutdown; exit through `finally`
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises SIGINT after its graceful shutdown
    finally:
        fake.images.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
