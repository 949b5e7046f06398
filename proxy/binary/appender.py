"""Appending a download to its new file, past the page cache where the filesystem allows it.

Why: a fill writes each byte of a multi-GB zip once and reads it back rarely (a later hit, by
``sendfile``). Through the page cache, every page written is first allocated and zeroed by the
kernel; on a virtual machine, whose freed memory the host takes back, that is faulted in again
each time: on the machine ``bench/series_cache.py`` ran on, a buffered 1 GB write cost 0.7 to
2.1 CPU seconds of system time, a direct one 0.1. A direct write also leaves the page cache to
what is read often (the metadata database, the files being served).

``O_DIRECT`` wants the memory, the file offset and the length aligned to the device's blocks: the
bytes are copied into an aligned buffer (an anonymous ``mmap``, page-aligned; the copy costs
about 0.02 s/GB) and written a whole buffer at a time. The tail, shorter than a block, is
written after ``O_DIRECT`` is turned off on the descriptor. Where the filesystem refuses direct
writes (some network and FUSE filesystems; systems without ``O_DIRECT``), at the open or at the
first write, the appender writes through the page cache instead.

Only the thread that appends may use an appender; :attr:`Appender.on_disk` is safe to read
from any thread (another descriptor reads the file up to it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

#: ``O_DIRECT`` where the system has it, else 0 (no direct writes).
DIRECT_FLAG: int = getattr(os, "O_DIRECT", 0)
#: Offsets and lengths of direct writes are multiples of this (4 KiB covers 512-byte and
#: 4 KiB logical blocks).
ALIGN = 4096
#: Bytes staged before one direct write; a multiple of :data:`ALIGN`.
BUFFER_BYTES = 1024 * 1024
_IOV_MAX = 512  # buffers per writev (Linux takes 1024)
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


class Appender:
    """Appends to a new file; call :meth:`finish` before the file is read whole (fsync)."""

    def __init__(self, fd: int, *, direct: bool, buffer_bytes: int = BUFFER_BYTES) -> None:
        if buffer_bytes <= 0 or buffer_bytes % ALIGN:
            raise ValueError(f"buffer_bytes must be a positive multiple of {ALIGN}")
        self.fd = fd
        #: Whether writes go past the page cache (False once the filesystem refused them).
        self.direct = direct
        #: Bytes appended so far.
        self.size = 0
        #: Bytes in the file: readable through another descriptor (the rest is staged).
        self.on_disk = 0
        self._capacity = buffer_bytes
        self._buffer: mmap.mmap | None = mmap.mmap(-1, buffer_bytes) if direct else None
        self._view = memoryview(self._buffer) if self._buffer is not None else None
        self._staged = 0

    @classmethod
    def create(
        cls, path: Path, *, direct: bool, mode: int = 0o600, buffer_bytes: int = BUFFER_BYTES
    ) -> Appender:
        """Create ``path`` (it must not exist) for appending, directly when asked and possible."""
        if direct and DIRECT_FLAG:
            try:
                fd = os.open(path, _NEW_FILE | DIRECT_FLAG, mode)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # The filesystem has no O_DIRECT. The file may exist by now (the check can
                # come after the create): it is this fill's own name, so it goes.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            else:
                try:
                    return cls(fd, direct=True, buffer_bytes=buffer_bytes)
                except BaseException:  # the buffer could not be mapped: no file is left open
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                    raise
        return cls(os.open(path, _NEW_FILE, mode), direct=False, buffer_bytes=buffer_bytes)

    def append(self, chunks: Sequence[bytes]) -> None:
        """Append ``chunks``; raises :class:`OSError` as ``write`` does (a full disk)."""
        count = sum(len(chunk) for chunk in chunks)
        buffered: Sequence[bytes] = chunks
        if self._view is not None:
            buffered = ()
            for index, chunk in enumerate(chunks):
                left = self._stage(chunk)
                if self._view is None:  # direct writes stopped (refused, short): buffered now
                    buffered = [bytes(left), *chunks[index + 1 :]]
                    break
        if buffered:
            self.on_disk += _write_fully(self.fd, buffered, self.on_disk)
        self.size += count

    def finish(self) -> None:
        """Write what is staged: the file then holds every byte appended."""
        if self._view is None or not self._staged:
            return
        whole = self._staged - self._staged % ALIGN
        if whole:
            # A refusal here is of these blocks only (the device wants more alignment than
            # ALIGN: 16 or 64 KiB blocks, which the whole buffers had): they go buffered.
            self._write_direct(self._view[:whole], may_refuse=True)
        rest = self._staged - whole
        if rest:
            self._go_buffered()  # the tail is not a whole block
            _pwrite_fully(self.fd, self._view[whole : whole + rest], self.on_disk)
            self.on_disk += rest
        self._staged = 0

    def close(self) -> None:
        """Close the file and free the buffer (what is staged is lost: call finish first)."""
        try:
            if self.fd >= 0:
                os.close(self.fd)
        finally:
            self.fd = -1
            self._free()

    def _stage(self, chunk: bytes) -> memoryview:
        """Copy ``chunk`` into the buffer, writing it each time it is full; returns what was
        left when direct writes stopped on the way (refused, or short: the buffer is gone then)."""
        assert self._view is not None
        data = memoryview(chunk)
        while data:
            take = min(len(data), self._capacity - self._staged)
            self._view[self._staged : self._staged + take] = data[:take]
            self._staged += take
            data = data[take:]
            if self._staged == self._capacity:
                # Refused at the first write: the filesystem took the flag at open but not the
                # write. Later, a refusal means something else is wrong: it is raised.
                self._write_direct(self._view, may_refuse=not self.on_disk)
                self._staged = 0
                if not self.direct:
                    self._free()
                    return data
        return data

    def _write_direct(self, data: memoryview, *, may_refuse: bool) -> None:
        """Write ``data`` (whole blocks) at the end of the file; a refusal (EINVAL, which comes
        before any byte is written) sends it, and what follows, through the page cache when
        ``may_refuse``, else is raised."""
        try:
            written = os.pwrite(self.fd, data, self.on_disk)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not may_refuse:
                raise
            written = 0
            self._go_buffered()
        if written < len(data):
            # A short write (the disk is filling up) leaves an unaligned offset: the rest
            # goes through the page cache, whose write reports the error if there is one.
            self._go_buffered()
            _pwrite_fully(self.fd, data[written:], self.on_disk + written)
        self.on_disk += len(data)

    def _go_buffered(self) -> None:
        if self.direct:
            clear_direct(self.fd)
            self.direct = False

    def _free(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._buffer is not None:
            buffer, self._buffer = self._buffer, None
            # A slice of it may live on in the traceback of a failed write: then the memory
            # goes when that does.
            with contextlib.suppress(BufferError):
                buffer.close()


def is_direct(fd: int) -> bool:
    """Whether ``fd``'s reads and writes go past the page cache."""
    return bool(DIRECT_FLAG and fcntl.fcntl(fd, fcntl.F_GETFL) & DIRECT_FLAG)


def clear_direct(fd: int) -> None:
    """From now on ``fd``'s reads and writes go through the page cache (no alignment)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~DIRECT_FLAG)


def _write_fully(fd: int, chunks: Sequence[bytes], offset: int) -> int:
    """Write all of ``chunks`` at ``offset`` (positioned: the descriptor's own offset is never
    used, so direct and buffered writes mix): one ``pwritev`` (at most :data:`_IOV_MAX` buffers
    a call), then whatever a short write left over. Returns the bytes written."""
    count = sum(len(chunk) for chunk in chunks)
    written = 0
    for start in range(0, len(chunks), _IOV_MAX):
        part = chunks[start : start + _IOV_MAX]
        done = os.pwritev(fd, part, offset + written)
        written += done
        if done < sum(len(chunk) for chunk in part):
            break
    if written < count:
        _pwrite_fully(fd, memoryview(b"".join(chunks))[written:], offset + written)
    return count


def _pwrite_fully(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data = data[done:]
        offset += done
