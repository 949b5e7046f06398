"""Reading files' bytes from disk: a piece at a time for a reader, without the event loop
waiting on the disk (:func:`read_at`), or whole for their sha256 (:func:`sha256_of`).

A kept file is sent with ``sendfile`` when the server offers the ASGI zero-copy send
(:mod:`proxy.zerocopy`: plain TCP under :class:`proxy.hit_protocol.HitProtocol`); this is the
other way, for a connection that cannot take it (TLS, uvicorn's plain protocol): each piece is
read here and sent as a body message. Measured (``bench.series_cache``), that way served a kept
1 GB zip at 0.79x to 0.97x nginx's ``sendfile``, at three times its CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import mmap
import os
import threading
from pathlib import Path

from proxy.binary.appender import DIRECT_FLAG, clear_direct, is_direct

#: Bytes read at once for a sha256: an aligned buffer (a direct read needs one) of this size.
HASH_READ_BYTES = 1024 * 1024


async def read_at(fd: int, count: int, offset: int) -> bytearray:
    """Up to ``count`` bytes of ``fd`` from ``offset`` (fewer at its end), read in a worker
    thread into a buffer allocated here, on the event loop's thread.

    ``asyncio.to_thread(os.pread, ...)`` allocates each buffer in the worker thread, and glibc
    gives each thread its own malloc arena: the freed megabytes stay in as many arenas as the
    pool has threads (about 12 MB of RSS for a download served at 2 MiB a read). Allocated
    here, they come from, and go back to, the loop thread's heap only.
    """
    buffer = bytearray(count)
    read = await asyncio.to_thread(os.preadv, fd, [buffer], offset)
    if read < count:
        del buffer[read:]
    return buffer


class Stopped(Exception):
    """A read stopped by its caller (:func:`sha256_of`'s ``stop``)."""


def sha256_of(
    path: Path, *, direct: bool = True, stop: threading.Event | None = None
) -> str | None:
    """The sha256 of the bytes of the file at ``path`` as the disk has them; None when it is
    gone. Blocking: call from a thread.

    ``direct``: read past the page cache (``O_DIRECT``) where the file system allows, so that
    hashing a multi-GB file neither fills the page cache nor pays for it (on a small VM a
    buffered read of 1 GB cost 2.7 s of CPU against 0.1 s read directly); where the open or a
    read refuses it, and without ``direct``, the reads are buffered. ``stop``, once set, ends
    the reading at the next piece with :class:`Stopped`.
    """
    try:
        fd = _open_for_hashing(path, direct)
    except FileNotFoundError:
        return None
    digest = hashlib.sha256()
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(-1, HASH_READ_BYTES) as buffer, memoryview(buffer) as view:
            offset = 0
            # Up to the size, not to a read of nothing: after the short read of the last
            # block, a direct read at that unaligned offset would be refused.
            while offset < size:
                if stop is not None and stop.is_set():
                    raise Stopped
                try:
                    read = os.preadv(fd, [buffer], offset)
                except OSError as exc:
                    if exc.errno != errno.EINVAL or not is_direct(fd):
                        raise
                    # The file system took the flag at open but refuses direct reads (as
                    # some refuse direct writes: proxy.binary.appender): on, buffered.
                    clear_direct(fd)
                    continue
                if not read:
                    raise OSError(errno.EIO, f"{path.name} shrank while it was hashed")
                digest.update(view[:read])
                offset += read
    finally:
        os.close(fd)
    return digest.hexdigest()


def _open_for_hashing(path: Path, direct: bool) -> int:
    flag = DIRECT_FLAG if direct else 0
    if flag:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC | flag)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this file system has no O_DIRECT
                raise
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return fd
