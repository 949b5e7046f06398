"""The appender: every byte lands in order, directly where the file system allows it, through
the page cache where it refuses (at the open, at the first write, or after a short write), and
``on_disk`` never claims a byte another descriptor cannot read yet."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.binary import appender as appender_module
from proxy.binary.appender import ALIGN, DIRECT_FLAG, Appender

SMALL = 64 * 1024  # a small buffer: a few chunks fill it, so every test crosses it often


def direct_supported(folder: Path) -> bool:
    """Whether ``folder``'s file system takes O_DIRECT writes (the kernel's own answer)."""
    if not DIRECT_FLAG:
        return False
    probe = folder / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | DIRECT_FLAG, 0o600)
    except OSError:
        return False
    try:
        block = mmap.mmap(-1, ALIGN)
        try:
            os.pwrite(fd, block, 0)
        except OSError:
            return False
        finally:
            block.close()
        return True
    finally:
        os.close(fd)
        probe.unlink()


def chunks_of(total: int, seed: int) -> list[bytes]:
    """Chunks of uneven sizes (some a whole buffer, some a byte), ``total`` bytes in all."""
    rng = random.Random(seed)
    out: list[bytes] = []
    left = total
    while left:
        size = min(left, rng.choice([1, 17, ALIGN, SMALL, SMALL + 1, rng.randrange(1, 3 * SMALL)]))
        out.append(rng.randbytes(size))
        left -= size
    return out


def is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & DIRECT_FLAG)


@pytest.fixture
def path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "fill.part"


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("total", [0, 1, ALIGN, SMALL, 5 * SMALL + 123, 7 * SMALL])
def test_every_byte_lands_in_order_and_on_disk_is_a_readable_prefix(
    path: Path, direct: bool, total: int
) -> None:
    chunks = chunks_of(total, seed=total)
    body = b"".join(chunks)
    file = Appender.create(path, direct=direct, buffer_bytes=SMALL)
    assert file.direct == (direct and direct_supported(path.parent))
    reader = os.open(path, os.O_RDONLY)
    try:
        appended = 0
        for start in range(0, len(chunks), 3):  # batches of three, as the writer thread does
            batch = chunks[start : start + 3]
            file.append(batch)
            appended += sum(len(c) for c in batch)
            assert file.size == appended and file.on_disk <= appended
            assert os.pread(reader, file.on_disk + 1, 0)[: file.on_disk] == body[: file.on_disk]
            if file.direct:  # a whole buffer is written as soon as it is full
                assert appended - file.on_disk < SMALL
        file.finish()
        assert file.on_disk == file.size == total
        assert not file.direct or total % ALIGN == 0 or not is_direct(file.fd)
    finally:
        os.close(reader)
        file.close()
    assert path.read_bytes() == body
    assert file.fd == -1


def test_a_direct_fill_uses_o_direct_until_its_tail(path: Path) -> None:
    if not direct_supported(path.parent):
        # This file system refuses direct writes: then the appender must not claim them.
        file = Appender.create(path, direct=True)
        assert not file.direct and not is_direct(file.fd)
        file.close()
        return
    file = Appender.create(path, direct=True, buffer_bytes=SMALL)
    assert file.direct and is_direct(file.fd)
    file.append([b"x" * (2 * SMALL + 10)])
    assert file.on_disk == 2 * SMALL and is_direct(file.fd)
    file.finish()  # 10 bytes: not a whole block, so written through the page cache
    assert not is_direct(file.fd) and file.on_disk == 2 * SMALL + 10
    file.close()
    assert path.read_bytes() == b"x" * (2 * SMALL + 10)


def test_asked_for_buffered_writes_it_never_uses_o_direct(path: Path) -> None:
    file = Appender.create(path, direct=False)
    file.append([b"y" * (3 * SMALL)])
    assert not file.direct and not is_direct(file.fd) and file.on_disk == 3 * SMALL
    file.close()


def test_a_file_system_that_refuses_o_direct_at_open_gets_buffered_writes(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refuse(name: Any, flags: int, *args: Any) -> int:
        if flags & DIRECT_FLAG:
            real_open(name, flags & ~DIRECT_FLAG, *args)  # created, then refused (as tmpfs did)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(name, flags, *args)

    monkeypatch.setattr(appender_module.os, "open", refuse)
    monkeypatch.setattr(appender_module, "DIRECT_FLAG", DIRECT_FLAG or 0o40000)
    file = Appender.create(path, direct=True)
    assert not file.direct
    file.append([b"z" * 5000])
    assert file.on_disk == 5000  # buffered: every byte is in the file at once
    file.close()
    assert path.read_bytes() == b"z" * 5000


def refusing_first_direct_write(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make ``pwrite`` refuse (EINVAL) while the descriptor is in O_DIRECT mode; returns the
    sizes of the refused writes."""
    real_pwrite = os.pwrite
    refused: list[int] = []

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if DIRECT_FLAG and is_direct(fd):
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(appender_module.os, "pwrite", pwrite)
    return refused


def test_a_file_system_that_refuses_the_first_direct_write_gets_buffered_writes(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not direct_supported(path.parent):
        pytest.skip("this file system has no O_DIRECT: the open falls back (tested above)")
    refused = refusing_first_direct_write(monkeypatch)
    file = Appender.create(path, direct=True, buffer_bytes=SMALL)
    chunks = chunks_of(4 * SMALL + 99, seed=7)
    file.append(chunks[:2])
    file.append(chunks[2:])
    file.finish()
    assert refused == [SMALL] and not file.direct and not is_direct(file.fd)
    assert file.on_disk == file.size == 4 * SMALL + 99
    file.close()
    assert path.read_bytes() == b"".join(chunks)


def test_a_refusal_after_bytes_were_written_directly_is_an_error(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not direct_supported(path.parent):
        pytest.skip("this file system has no O_DIRECT: nothing is ever written directly")
    file = Appender.create(path, direct=True, buffer_bytes=SMALL)
    file.append([b"a" * SMALL])  # written directly
    refusing_first_direct_write(monkeypatch)
    # Not silently buffered: a refusal in the middle of a file means something else is wrong.
    with pytest.raises(OSError) as raised:
        file.append([b"b" * SMALL])
    assert raised.value.errno == errno.EINVAL
    file.close()


def test_a_short_direct_write_is_finished_through_the_page_cache(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwrite = os.pwrite
    calls: list[tuple[int, bool]] = []

    def short(fd: int, data: Any, offset: int) -> int:
        direct = bool(DIRECT_FLAG) and is_direct(fd)
        calls.append((len(data), direct))
        if direct and len(calls) == 1:
            return real_pwrite(fd, memoryview(data)[:ALIGN], offset)  # the disk took a block
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(appender_module.os, "pwrite", short)
    chunks = chunks_of(3 * SMALL + 5, seed=3)
    file = Appender.create(path, direct=True, buffer_bytes=SMALL)
    file.append(chunks)
    file.finish()
    assert file.on_disk == file.size == 3 * SMALL + 5 and not file.direct
    if direct_supported(path.parent):
        assert calls[:2] == [(SMALL, True), (SMALL - ALIGN, False)]
    file.close()
    assert path.read_bytes() == b"".join(chunks)


def test_a_short_buffered_write_is_finished(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwritev = os.pwritev
    calls: list[int] = []

    def short(fd: int, buffers: Any, offset: int) -> int:
        calls.append(len(buffers))
        return real_pwritev(fd, [bytes(buffers[0])[:1000]], offset)  # the kernel took 1000

    monkeypatch.setattr(appender_module.os, "pwritev", short)
    chunks = [bytes([n]) * 5000 for n in range(1, 5)]
    file = Appender.create(path, direct=False)
    file.append(chunks)
    file.append([b"tail"])
    assert calls == [4, 1] and file.on_disk == file.size == 20_004
    file.close()
    body = b"".join(chunks) + b"tail"
    assert path.read_bytes() == body
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("direct", [True, False])
def test_a_full_disk_is_an_error_of_the_append_or_the_finish(
    path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(appender_module.os, "pwrite", full)
    monkeypatch.setattr(appender_module.os, "pwritev", full)
    file = Appender.create(path, direct=direct, buffer_bytes=SMALL)
    step: Callable[[], None] = lambda: file.append([b"q" * 10])  # noqa: E731
    if file.direct:
        step()  # staged: nothing is written yet
        step = file.finish
    with pytest.raises(OSError) as raised:
        step()
    assert raised.value.errno == errno.ENOSPC
    file.close()


def test_the_buffer_must_be_whole_blocks(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(ValueError, match="multiple"):
            Appender(fd, direct=True, buffer_bytes=ALIGN + 1)
    finally:
        os.close(fd)


def test_a_buffer_that_cannot_be_mapped_leaves_no_file_open(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not direct_supported(path.parent):
        pytest.skip("this file system has no O_DIRECT: no buffer is mapped")

    def no_memory(*args: Any) -> Any:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(appender_module.mmap, "mmap", no_memory)
    with pytest.raises(OSError) as raised:
        Appender.create(path, direct=True)
    assert raised.value.errno == errno.ENOMEM
    assert not path.exists()
    assert set(os.listdir("/proc/self/fd")) <= before


def test_a_device_wanting_larger_blocks_gets_the_last_ones_buffered(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole buffers pass a 64 KiB alignment, the last blocks (4 KiB multiples) may not."""
    real_pwrite = os.pwrite

    def strict(fd: int, data: Any, offset: int) -> int:
        if DIRECT_FLAG and is_direct(fd) and (len(data) % SMALL or offset % SMALL):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(appender_module.os, "pwrite", strict)
    chunks = chunks_of(2 * SMALL + 3 * ALIGN + 7, seed=11)
    file = Appender.create(path, direct=True, buffer_bytes=SMALL)
    file.append(chunks)
    file.finish()
    assert file.on_disk == file.size == 2 * SMALL + 3 * ALIGN + 7
    file.close()
    assert path.read_bytes() == b"".join(chunks)
