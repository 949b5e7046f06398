"""The kept-binaries store: atomic publish, what is never served, LRU under a cap, failures that
never reach the relay, replicas on one directory, and zero-copy sending over a real socket.

Crashes are real where they can be (``kill -9`` of a process in the middle of a fill) and
simulated by leaving files behind otherwise. A full disk is simulated by making ``os.write``
fail with ENOSPC; a directory that cannot be written by ``chmod``, or, as root (who writes
anywhere), by making ``os.open`` fail with EACCES.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from proxy.binary import disk as disk_module
from proxy.binary import files as files_module
from proxy.binary.disk import read_at, sha256_of
from proxy.binary.files import (
    MARKER,
    BinaryStore,
    Kept,
    Meta,
    capped_max_bytes,
    directory_for,
)
from proxy.binary.tables import BinaryFile, BinaryTag
from proxy.cache.policy import CacheKey
from proxy.cli import build_parser, settings_from_args
from proxy.config import load_settings
from proxy.db import make_engine, migrate
from tests.databases import BACKENDS, database
from tests.gateway_server import Clock

NOW = 1_800_000_000.0
ZIP = Meta("application/zip", 'attachment; filename="series.zip"', "full")


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        migrate(url)
        yield url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def store(engine: Engine, tmp_path: Path, clock: Clock) -> BinaryStore:
    return make_store(engine, tmp_path, clock)


def make_store(
    engine: Engine,
    tmp_path: Path,
    clock: Clock,
    max_bytes: int = 1 << 30,
    host: str = "here",
    start: bool = True,
) -> BinaryStore:
    store = BinaryStore(engine, tmp_path / "binaries", max_bytes, clock=clock, host=host)
    if start:
        store.start()
    return store


def image_key(series: str, new_file_names: str = "No") -> CacheKey:
    """A key as the gateway makes one for ``GET v4/getImage`` (built here, so these tests do not
    depend on how keys are made)."""
    params = f"?NewFileNames={new_file_names}&SeriesInstanceUID={series}"
    text_ = f"nbia\nanonymous\nGET\nv4/getImage\n{params}"
    digest = hashlib.sha256(text_.encode()).hexdigest()
    tags = frozenset({("series", series)})
    return CacheKey(digest, "nbia", "anonymous", "GET", "v4/getImage", params, tags)


def keep(store: BinaryStore, key: CacheKey, body: bytes, meta: Meta = ZIP) -> Kept:
    with store.open_fill(key) as fill:
        for start in range(0, len(body), 4096):
            fill.write(body[start : start + 4096])
        kept = fill.commit(meta)
    assert kept is not None, fill.broken
    return kept


def files_in(directory: Path) -> list[Path]:
    """The files of downloads (not the directory's marker)."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)


def body_of(size: int, seed: bytes = b"x") -> bytes:
    block = hashlib.sha256(seed).digest()
    return (block * (size // len(block) + 1))[:size]


# round trip ----------------------------------------------------------------------------------


def test_commit_then_lookup_roundtrip(store: BinaryStore, engine: Engine) -> None:
    key = image_key("1.2.3")
    body = body_of(100_000)
    kept = keep(store, key, body)
    assert (kept.size, kept.sha256) == (len(body), hashlib.sha256(body).hexdigest())
    assert kept.etag == b'"' + kept.sha256.encode() + b'"'
    assert kept.path.read_bytes() == body
    assert kept.path.parent == store.directory / key.digest[:2] / key.digest[2:4]
    assert stat.S_IMODE(kept.path.stat().st_mode) == 0o600
    for folder in (store.directory, kept.path.parent.parent, kept.path.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert files_in(store.directory) == [kept.path]  # no temporary file left

    found = store.lookup(key.digest)
    assert found == kept
    assert (found.content_type, found.validation) == ("application/zip", "full")
    assert found.content_disposition == 'attachment; filename="series.zip"'
    with Session(engine) as session:
        row = session.scalars(select(BinaryFile)).one()
        assert (row.endpoint, row.params, row.upstream) == ("v4/getImage", key.params, "nbia")
        assert (row.fetched_at, row.last_used_at) == (NOW, NOW)
        tags = {(t.kind, t.value) for t in session.scalars(select(BinaryTag))}
        assert tags == {("series", "1.2.3")}
    reading = store.open_read(found)
    assert reading is not None
    with reading:
        assert reading.file.read() == body
    assert store.stats().files == 1 and store.stats().bytes == len(body)


def test_request_variants_are_separate_files(store: BinaryStore) -> None:
    plain = keep(store, image_key("1.2.3", "No"), b"numbered names")
    named = keep(store, image_key("1.2.3", "Yes"), b"original names")
    assert plain.path != named.path
    assert store.lookup(image_key("1.2.3", "No").digest) == plain
    assert store.lookup(image_key("1.2.3", "Yes").digest) == named


def test_a_second_fetch_replaces_the_file_and_the_old_reader_keeps_its_bytes(
    store: BinaryStore,
) -> None:
    key = image_key("1.2.3")
    old = keep(store, key, b"first fetch" * 1000)
    reading = store.open_read(old)
    assert reading is not None
    new = keep(store, key, b"second fetch, other bytes" * 1000)
    assert new.path != old.path and not old.path.exists()
    assert store.lookup(key.digest) == new
    with reading:
        assert reading.file.read() == b"first fetch" * 1000  # POSIX: the open file lives on
    assert files_in(store.directory) == [new.path]
    assert store.total_bytes() == new.size
    assert store.purge(series="1.2.3") == (1, new.size)  # the tags were written again


def test_the_same_bytes_fetched_again_keep_their_file(
    store: BinaryStore, engine: Engine, clock: Clock
) -> None:
    key = image_key("1.2.3")
    first = keep(store, key, b"an unchanged DICOM file")
    inode = first.path.stat().st_ino
    reading = store.open_read(first)
    assert reading is not None
    clock.advance(60)
    again = keep(store, key, b"an unchanged DICOM file")
    assert again.path == first.path and again.path.stat().st_ino == inode  # not replaced
    assert again.fetched_at == NOW + 60 and files_in(store.directory) == [first.path]
    with reading:
        assert reading.file.read() == b"an unchanged DICOM file"
    # A database failure on the next fetch must not take the file the row still names.
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE binary_tags"))
    with store.open_fill(key) as fill:
        fill.write(b"an unchanged DICOM file")
        assert fill.commit(ZIP) is None
    assert first.path.exists()


def test_a_discarded_or_abandoned_fill_is_never_kept(store: BinaryStore) -> None:
    key = image_key("1.2.3")
    fill = store.open_fill(key)
    fill.write(b"not valid")
    fill.discard()
    assert fill.commit(ZIP) is None
    with store.open_fill(key) as fill:
        fill.write(b"the relay failed half way")
        # leaving the block without commit (an exception in the relay) throws it away
    assert files_in(store.directory) == []
    assert store.lookup(key.digest) is None


# what is never served ------------------------------------------------------------------------


def test_an_uncommitted_fill_leaves_only_a_part_file_which_the_sweep_removes(
    store: BinaryStore, engine: Engine, tmp_path: Path, clock: Clock
) -> None:
    key = image_key("1.2.3")
    fill = store.open_fill(key)
    fill.write(b"half a series")  # the process "crashes" here: no commit, no discard
    [part] = files_in(store.directory)
    assert ".part-here-" in part.name and stat.S_IMODE(part.stat().st_mode) == 0o600
    os.utime(part, (NOW, NOW))  # written "now" by the test's clock
    assert store.lookup(key.digest) is None
    assert store.sweep_leftovers().parts == 0  # this process's own fill, still going

    clock.advance(files_module.STALE_SECONDS + 1)
    restarted = make_store(engine, tmp_path, clock)
    assert restarted.sweep_leftovers().parts == 0  # a live fill of this process, however slow

    files_module._LIVE_TEMPS.discard(part)  # the process "dies": its memory of the fill goes
    assert restarted.sweep_leftovers().parts == 1
    assert files_in(store.directory) == []
    fill.discard()  # (closes the descriptor the "dead" process held)


def test_kill_9_in_the_middle_of_a_fill(db_url: str, engine: Engine, tmp_path: Path) -> None:
    """A real crash: a process filling is killed; nothing is served, the next start sweeps."""
    key = image_key("1.2.3")
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from proxy.binary.files import BinaryStore
        from proxy.cache.policy import CacheKey
        from proxy.db import make_engine
        key = CacheKey({key.digest!r}, "nbia", "anonymous", "GET", "v4/getImage", "", frozenset())
        directory = Path({str(tmp_path / "binaries")!r})
        store = BinaryStore(make_engine({db_url!r}), directory, 1 << 30, host="here")
        fill = store.open_fill(key)
        for _ in range(64):
            fill.write(b"z" * 16384)
        print(fill.temp, flush=True)
        time.sleep(120)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        part = Path(child.stdout.readline().strip())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert part.exists() and part.stat().st_size == 64 * 16384
    os.utime(part, (NOW, NOW))  # fresh by the test's clock: only the dead pid gives it away
    store = make_store(engine, tmp_path, Clock(NOW), start=False)
    assert store.lookup(key.digest) is None
    # Fresh, but its process is gone: swept at start although another replica's would be kept.
    assert store.start() == files_module.Swept(parts=1)
    assert files_in(store.directory) == []


def test_part_files_of_other_hosts_are_swept_only_when_stale(
    store: BinaryStore, clock: Clock
) -> None:
    folder = store.directory / "ab" / "cd"
    folder.mkdir(parents=True)
    other = folder / f"{'ab' * 32}.part-elsewhere-1-0a0b0c0d"  # pid 1 is alive here; not ours
    dead_here = folder / f"{'ab' * 32}.part-here-999999999-0a0b0c0d"  # no such pid
    # Our pid, but no fill of ours: an earlier gateway with the same pid (pid 1 in a container).
    earlier_self = folder / f"{'ab' * 32}.part-here-{os.getpid()}-0a0b0c0d"
    other.write_bytes(b"another replica is filling")
    dead_here.write_bytes(b"a fill of ours that died")
    earlier_self.write_bytes(b"the last run's")
    for path in (other, dead_here, earlier_self):
        os.utime(path, (NOW, NOW))
    assert store.sweep_leftovers().parts == 2
    assert other.exists() and not dead_here.exists() and not earlier_self.exists()
    clock.advance(files_module.STALE_SECONDS + 1)
    assert store.sweep_leftovers().parts == 1
    assert not other.exists()


def test_a_file_without_a_row_is_not_served_and_swept_when_old(
    store: BinaryStore, engine: Engine, clock: Clock
) -> None:
    """A crash between the rename and the row leaves a complete file nothing names."""
    key = image_key("1.2.3")
    kept = keep(store, key, b"complete bytes")
    with Session(engine) as session, session.begin():
        session.execute(text("DELETE FROM binary_tags"))
        session.execute(text("DELETE FROM binary_files"))
    assert kept.path.exists()
    assert store.lookup(key.digest) is None
    os.utime(kept.path, (NOW, NOW))
    assert store.sweep_leftovers().orphans == 0  # maybe another replica about to write its row
    clock.advance(files_module.STALE_SECONDS + 1)
    assert store.sweep_leftovers().orphans == 1
    assert files_in(store.directory) == []


def test_a_row_whose_file_is_gone_is_dropped(store: BinaryStore) -> None:
    key = image_key("1.2.3")
    kept = keep(store, key, b"bytes")
    kept.path.unlink()
    assert store.lookup(key.digest) is None
    assert store.counters.dropped == 1
    assert store.stats().files == 0


def test_a_file_of_the_wrong_size_is_not_served_and_removed(store: BinaryStore) -> None:
    key = image_key("1.2.3")
    kept = keep(store, key, b"all the bytes of the series")
    with kept.path.open("r+b") as handle:
        handle.truncate(5)
    assert store.lookup(key.digest) is None
    assert not kept.path.exists() and store.stats().files == 0


def test_a_file_that_goes_between_lookup_and_open_is_a_miss(store: BinaryStore) -> None:
    key = image_key("1.2.3")
    kept = keep(store, key, b"bytes")
    kept.path.unlink()
    assert store.open_read(kept) is None
    assert store.lookup(key.digest) is None


def test_a_volume_not_mounted_loses_nothing(
    store: BinaryStore,
    engine: Engine,
    tmp_path: Path,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An empty mount point in place of the shared volume: misses, but no row dropped and no
    file swept, so that everything is there again once the volume is back."""
    kept = keep(store, image_key("1.2.3"), b"on the shared volume")
    mounted = tmp_path / "volume"
    store.directory.rename(mounted)
    store.directory.mkdir()  # the bare mount point
    clock.advance(files_module.STALE_SECONDS + 1)
    restarted = make_store(engine, tmp_path, clock, start=False)
    with caplog.at_level(logging.WARNING, logger="nbia_proxy.binary"):
        assert restarted.start() == files_module.Swept()
    assert "is the volume mounted?" in caplog.text
    assert restarted.lookup(kept.digest) is None
    assert restarted.sweep_leftovers() == files_module.Swept()
    assert restarted.stats().files == 1 and restarted.counters.dropped == 0
    store.directory.rmdir()
    mounted.rename(store.directory)  # mounted again
    assert restarted.lookup(kept.digest) == kept
    assert restarted.sweep_leftovers() == files_module.Swept()


def test_the_sweep_drops_rows_without_files(store: BinaryStore) -> None:
    gone = keep(store, image_key("1"), b"one")
    there = keep(store, image_key("2"), b"two")
    gone.path.unlink()
    assert store.sweep_leftovers() == files_module.Swept(rows=1)
    assert store.lookup(image_key("2").digest) == there


# space ---------------------------------------------------------------------------------------


def test_least_recently_used_files_go_first_and_the_cap_holds(
    engine: Engine, tmp_path: Path, clock: Clock
) -> None:
    store = make_store(engine, tmp_path, clock, max_bytes=3000)
    kept = {}
    for name in "abc":
        kept[name] = keep(store, image_key(name), body_of(1000, name.encode()))
        clock.advance(10)
    store.touch(kept["a"])  # a is used again: b is now the least recently used
    clock.advance(10)
    keep(store, image_key("d"), body_of(1000, b"d"))
    assert store.lookup(image_key("b").digest) is None and not kept["b"].path.exists()
    assert store.lookup(image_key("a").digest) is not None
    assert store.total_bytes() == 3000 and store.counters.evicted == 1
    keep(store, image_key("e"), body_of(2000, b"e"))  # needs two to go: c, then a
    assert {name for name in "acde" if store.lookup(image_key(name).digest)} == {"d", "e"}
    assert store.total_bytes() <= 3000
    assert len(files_in(store.directory)) == 2


def test_a_file_being_read_or_filled_is_never_evicted(
    engine: Engine, tmp_path: Path, clock: Clock
) -> None:
    store = make_store(engine, tmp_path, clock, max_bytes=3000)
    a = keep(store, image_key("a"), body_of(1000, b"a"))
    clock.advance(10)
    b = keep(store, image_key("b"), body_of(1000, b"b"))
    clock.advance(10)
    c = keep(store, image_key("c"), body_of(1000, b"c"))
    clock.advance(10)
    reading = store.open_read(a)  # the least recently used, but being served
    assert reading is not None
    refill = store.open_fill(image_key("b"))  # the next one is being fetched again
    refill.write(b"new b")
    d = keep(store, image_key("d"), body_of(1000, b"d"))
    assert store.lookup(image_key("c").digest) is None  # c went, though used after a and b
    assert store.lookup(image_key("a").digest) is not None
    assert store.lookup(image_key("b").digest) is not None
    serving_d = store.open_read(d)
    assert serving_d is not None
    # Nothing else may go: the next download does not fit and is relayed without being kept.
    with store.open_fill(image_key("e")) as fill:
        fill.write(body_of(1000, b"e"))
        assert fill.commit(ZIP) is None
    assert store.counters.no_room == 1
    assert store.lookup(image_key("e").digest) is None
    reading.close()
    serving_d.close()
    refill.discard()
    keep(store, image_key("e"), body_of(1000, b"e"))  # now b, the least recently used, goes
    assert store.lookup(image_key("b").digest) is None
    assert {a.path, b.path, c.path, d.path} & set(files_in(store.directory)) == {a.path, d.path}


def test_room_is_made_before_the_first_byte_when_the_size_is_known(
    engine: Engine, tmp_path: Path, clock: Clock
) -> None:
    store = make_store(engine, tmp_path, clock, max_bytes=3000)
    for name in "ab":
        keep(store, image_key(name), body_of(1000, name.encode()))
        clock.advance(10)
    fill = store.open_fill(image_key("c"), expected_size=2000)
    assert fill.broken is None
    assert store.lookup(image_key("a").digest) is None  # gone before c's bytes arrived
    assert store.lookup(image_key("b").digest) is not None
    fill.write(body_of(2000, b"c"))
    kept = fill.commit(ZIP)
    assert kept is not None
    too_big = store.open_fill(image_key("d"), expected_size=3001)
    assert too_big.broken == "larger than binary_cache_max_bytes"
    too_big.write(b"relayed anyway")
    assert too_big.commit(ZIP) is None
    reading = store.open_read(kept)
    assert reading is not None
    with reading:
        blocked = store.open_fill(image_key("e"), expected_size=2500)
        assert blocked.broken == "no room under binary_cache_max_bytes"
    assert (store.counters.too_large, store.counters.no_room) == (1, 1)
    assert [p.name for p in files_in(store.directory) if ".part-" in p.name] == []


def test_served_times_are_batched_and_written_on_close(
    store: BinaryStore, engine: Engine, clock: Clock
) -> None:
    kept = keep(store, image_key("a"), b"a")
    store.flush()
    clock.advance(1)
    store.touch(kept)
    with Session(engine) as session:
        assert session.scalar(select(BinaryFile.last_used_at)) == NOW  # not yet written
    clock.advance(10)
    store.touch(kept)  # the batch is due: written now
    with Session(engine) as session:
        assert session.scalar(select(BinaryFile.last_used_at)) == NOW + 11
    clock.advance(1)
    store.touch(kept)
    store.close()
    with Session(engine) as session:
        assert session.scalar(select(BinaryFile.last_used_at)) == NOW + 12


def test_a_download_larger_than_the_cap_is_relayed_not_kept(
    engine: Engine, tmp_path: Path, clock: Clock
) -> None:
    store = make_store(engine, tmp_path, clock, max_bytes=1000)
    fill = store.open_fill(image_key("big"))
    fill.write(b"x" * 600)
    fill.write(b"x" * 600)  # over the cap: given up at once, temp file gone
    fill.write(b"x" * 600)  # the relay keeps calling: harmless
    assert fill.broken == "larger than binary_cache_max_bytes"
    assert fill.commit(ZIP) is None
    assert files_in(store.directory) == []
    assert store.counters.too_large == 1 and store.counters.write_failures == 0


def test_the_cap_is_lowered_to_what_the_disk_holds(
    store: BinaryStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    kept = keep(store, image_key("a"), b"x" * 5000)

    class Disk:
        f_frsize = 4096
        f_blocks = 100 * 1024**3 // 4096  # 100 GiB disk: the margin is 1 GiB
        f_bavail = 10 * 1024**3 // 4096  # 10 GiB free

    monkeypatch.setattr(files_module.os, "statvfs", lambda path: Disk)
    assert capped_max_bytes(50 * 1000**3, store.directory, 0) == 9 * 1024**3
    assert capped_max_bytes(2 * 1024**3, store.directory, 0) == 2 * 1024**3  # fits: unchanged
    Disk.f_blocks = 4 * 1024**3 // 4096  # a 4 GiB disk: the margin is 5 %
    assert capped_max_bytes(50 * 1000**3, store.directory, 100) == 10 * 1024**3 + 100 - int(
        4 * 1024**3 * 0.05
    )
    store.max_bytes = 50 * 1000**3
    with caplog.at_level(logging.INFO, logger="nbia_proxy.binary"):
        store.start()
    assert store.max_bytes == 10 * 1024**3 + kept.size - int(4 * 1024**3 * 0.05)
    [line] = [r.getMessage() for r in caplog.records if "cap" in r.getMessage()]
    assert "10.5 GB cap" in line and "50.0 GB" in line


# failures never reach the relay ----------------------------------------------------------------


def test_a_directory_that_cannot_be_written_keeps_relaying(
    store: BinaryStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if os.geteuid() != 0:
        store.directory.chmod(0o500)
    else:  # root writes anywhere: refuse the create as the kernel would
        real_open = os.open

        def refuse(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if ".part-" in str(path):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(files_module.os, "open", refuse)
    try:
        with caplog.at_level(logging.WARNING, logger="nbia_proxy.binary"):
            for name in "abc":
                with store.open_fill(image_key(name)) as fill:
                    fill.write(b"bytes the client still gets")
                    assert fill.commit(ZIP) is None
                assert fill.broken is not None and "Permission denied" in fill.broken
    finally:
        store.directory.chmod(0o700)
    assert store.counters.write_failures == 3
    assert "Permission denied" in (store.counters.last_failure or "")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "relayed" in warnings[0].getMessage()
    assert store.stats().files == 0


def test_a_full_disk_breaks_the_fill_not_the_relay(
    store: BinaryStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_pwrite, real_pwritev = os.pwrite, os.pwritev
    room = {"left": 10_000}

    def take(size: int) -> None:
        if room["left"] < size:
            raise OSError(errno.ENOSPC, "No space left on device")
        room["left"] -= size

    def pwrite(fd: int, data: Any, offset: int) -> int:
        take(len(data))
        return real_pwrite(fd, data, offset)

    def pwritev(fd: int, buffers: Any, offset: int) -> int:
        take(sum(len(b) for b in buffers))
        return real_pwritev(fd, buffers, offset)

    # The appender writes positioned, directly (one pwrite a full buffer or at the commit)
    # or, where the file system refuses that, through the page cache (pwritev).
    monkeypatch.setattr(files_module.os, "pwrite", pwrite)
    monkeypatch.setattr(files_module.os, "pwritev", pwritev)
    with caplog.at_level(logging.WARNING, logger="nbia_proxy.binary"):
        for name in "ab":
            with store.open_fill(image_key(name)) as fill:
                for _ in range(10):
                    fill.write(b"y" * 4096)
                assert fill.commit(ZIP) is None
            assert fill.broken is not None and "No space left" in fill.broken
    assert files_in(store.directory) == []  # the partial files went at once
    assert store.counters.write_failures == 2
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    room["left"] = 1 << 30  # space again: the next download is kept
    kept = keep(store, image_key("c"), b"z" * 50_000)
    assert store.lookup(image_key("c").digest) == kept


def test_a_database_that_refuses_the_row_leaves_no_file(
    store: BinaryStore, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE binary_tags"))
    with caplog.at_level(logging.WARNING, logger="nbia_proxy.binary"):
        with store.open_fill(image_key("a")) as fill:
            fill.write(b"bytes")
            assert fill.commit(ZIP) is None
    assert files_in(store.directory) == []
    assert store.counters.write_failures == 1 and len(caplog.records) == 1


# replicas ------------------------------------------------------------------------------------


def test_two_stores_on_one_directory_and_database_see_each_others_files(
    db_url: str, tmp_path: Path, clock: Clock
) -> None:
    first_engine, second_engine = make_engine(db_url), make_engine(db_url)
    try:
        first = make_store(first_engine, tmp_path, clock, host="replica1")
        second = make_store(second_engine, tmp_path, clock, host="replica2")
        key = image_key("1.2.3")
        kept = keep(first, key, b"filled by the first replica")
        found = second.lookup(key.digest)
        assert found == kept
        reading = second.open_read(found)
        assert reading is not None
        with reading:
            assert reading.file.read() == b"filled by the first replica"
        newer = keep(second, key, b"fetched again by the second")
        assert first.lookup(key.digest) == newer and not kept.path.exists()
        # A stale view of the old row never drops the newer one.
        assert first.open_read(kept) is None
        assert second.lookup(key.digest) == newer
        assert first.sweep_leftovers() == files_module.Swept()
        assert second.sweep_leftovers() == files_module.Swept()
        assert first.remove(key.digest) is True
        assert second.lookup(key.digest) is None and files_in(tmp_path / "binaries") == []
    finally:
        first_engine.dispose()
        second_engine.dispose()


def test_threads_filling_reading_and_evicting_at_once_keep_the_store_consistent(
    engine: Engine, tmp_path: Path
) -> None:
    """Served bytes always match their row, and the cap holds, whatever the interleaving."""
    store = BinaryStore(engine, tmp_path / "binaries", 20_000, host="here")
    store.start()
    served_wrong: list[str] = []

    def work(worker: int) -> None:
        for round_ in range(25):
            key = image_key(f"{(worker * 7 + round_) % 9}")
            body = body_of(1000 + 500 * (round_ % 5), f"{worker}-{round_}".encode())
            with store.open_fill(key) as fill:
                fill.write(body)
                fill.commit(ZIP)
            found = store.lookup(image_key(f"{round_ % 9}").digest)
            reading = store.open_read(found) if found else None
            if reading is not None:
                with reading:
                    data = reading.file.read()
                if hashlib.sha256(data).hexdigest() != reading.kept.sha256:
                    served_wrong.append(reading.kept.digest)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert served_wrong == []
    assert store.total_bytes() <= 20_000
    assert store.counters.write_failures == 0
    store.sweep_leftovers(stale_seconds=-1)  # everything not named by a row goes
    named = {store.path_for(k.digest, k.sha256) for k in map(store.lookup, _digests(engine)) if k}
    assert set(files_in(store.directory)) == named


def _digests(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return list(session.scalars(select(BinaryFile.digest)))


def test_purge_by_series_and_by_endpoint(store: BinaryStore) -> None:
    a = keep(store, image_key("1.2.3"), b"a")
    keep(store, image_key("1.2.3", "Yes"), b"bb")
    c = keep(store, image_key("4.5.6"), b"ccc")
    assert store.purge(series="1.2.3") == (2, 3)
    assert store.lookup(image_key("4.5.6").digest) == c and not a.path.exists()
    assert store.purge(pattern="v4/getIm*") == (1, 3)
    assert store.purge() == (0, 0) and files_in(store.directory) == []


# settings ------------------------------------------------------------------------------------


def test_settings_from_flag_env_and_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    defaults = load_settings()
    assert defaults.binary_cache_enabled is True
    assert defaults.binary_cache_max_bytes == 50 * 1000**3
    assert directory_for(defaults) == defaults.data_dir / "binaries"
    config = tmp_path / "s.toml"
    config.write_text('binary_dir = "/srv/shared"\nbinary_cache_max_bytes = 1000\n')
    monkeypatch.setenv("NBIA_PROXY_BINARY_CACHE_MAX_BYTES", "2000")
    args = ["serve", "--config", str(config), "--no-binary-cache-enabled"]
    settings = settings_from_args(build_parser().parse_args(args))
    assert directory_for(settings) == Path("/srv/shared")
    assert settings.binary_cache_max_bytes == 2000  # env over file
    assert settings.binary_cache_enabled is False
    args = ["serve", "--binary-dir", str(tmp_path), "--binary-cache-max-bytes", "3000"]
    settings = settings_from_args(build_parser().parse_args(args))
    assert (settings.binary_dir, settings.binary_cache_max_bytes) == (tmp_path, 3000)


# reading -------------------------------------------------------------------------------------


def test_read_at_reads_a_range_and_stops_at_the_end(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    path = tmp_path / "kept"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:

        async def reads() -> list[bytes]:
            pieces = [await read_at(fd, 100_000, at) for at in (0, 123_456, 250_000, 300_000)]
            return [bytes(piece) for piece in pieces]

        whole, middle, tail, beyond = asyncio.run(reads())
    finally:
        os.close(fd)
    assert whole == data[:100_000]
    assert middle == data[123_456:223_456]
    assert tail == data[250_000:]  # fewer bytes at the end of the file, not padding
    assert beyond == b""


def test_a_full_disk_under_a_batch_breaks_the_fill(
    store: BinaryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_module.os, "pwrite", full)
    monkeypatch.setattr(files_module.os, "pwritev", full)
    with store.open_fill(image_key("full")) as fill:
        fill.append([b"a" * 4096, b"b" * 4096])
        fill.append([b"c" * 4096, b"d" * 4096])  # ignored: broken already
        assert fill.commit(ZIP) is None
    assert fill.broken is not None and "No space left" in fill.broken
    assert files_in(store.directory) == []
    assert store.counters.write_failures == 1


# the sha256, read back --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 1024 * 1024, 3 * 1024 * 1024 + 7])
@pytest.mark.parametrize("direct", [True, False])
def test_sha256_of_is_the_sha256_of_the_bytes(tmp_path: Path, size: int, direct: bool) -> None:
    data = os.urandom(size)
    path = tmp_path / "kept"
    path.write_bytes(data)
    assert sha256_of(path, direct=direct) == hashlib.sha256(data).hexdigest()


def test_sha256_of_reads_past_the_page_cache_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "kept"
    path.write_bytes(b"x" * 10_000)
    flags: list[int] = []
    real_open = os.open

    def recording(file: Any, flag: int, *args: Any) -> int:
        flags.append(flag)
        return real_open(file, flag, *args)

    monkeypatch.setattr(disk_module.os, "open", recording)
    sha256_of(path, direct=True)
    sha256_of(path, direct=False)
    assert [bool(flag & os.O_DIRECT) for flag in flags] == [True, False]


def test_sha256_of_falls_back_where_the_file_system_refuses_direct_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(70_000)
    path = tmp_path / "kept"
    path.write_bytes(data)
    real_open = os.open

    def no_direct(file: Any, flag: int, *args: Any) -> int:
        if flag & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(file, flag, *args)

    monkeypatch.setattr(disk_module.os, "open", no_direct)
    assert sha256_of(path) == hashlib.sha256(data).hexdigest()
    assert sha256_of(tmp_path / "gone") is None


def test_the_kept_files_name_and_etag_are_the_sha256_of_the_bytes_on_the_disk(
    store: BinaryStore,
) -> None:
    """The commit reads the sha256 back from the file, not from the bytes on their way: what
    names the file (and what ``cache verify`` compares) is what a hit will send."""
    with store.open_fill(image_key("disk")) as fill:
        fill.append([b"a" * 5000, b"b" * 5000])
        assert fill.temp is not None
        fill._file.finish()  # type: ignore[union-attr]  # on the disk, then changed there
        fd = os.open(fill.temp, os.O_WRONLY)
        os.pwrite(fd, b"Z", 7000)
        os.close(fd)
        kept = fill.commit(ZIP)
    assert kept is not None
    on_disk = b"a" * 5000 + b"b" * 2000 + b"Z" + b"b" * 2999
    assert kept.sha256 == hashlib.sha256(on_disk).hexdigest()
    assert kept.path.read_bytes() == on_disk


def test_a_file_whose_size_on_the_disk_is_not_the_downloads_is_not_kept(
    store: BinaryStore,
) -> None:
    with store.open_fill(image_key("short")) as fill:
        fill.append([b"a" * 9000])
        assert fill.temp is not None
        fill._file.finish()  # type: ignore[union-attr]
        os.truncate(fill.temp, 4096)
        assert fill.commit(ZIP) is None
    assert fill.broken is not None and "not the size of the download" in fill.broken
    assert files_in(store.directory) == []
    assert store.counters.write_failures == 1


def test_sha256_of_a_file_that_shrinks_while_it_is_read_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "kept"
    path.write_bytes(b"x" * 5000)
    real_fstat = os.fstat

    class Larger:
        def __init__(self, real: os.stat_result) -> None:
            self.st_size = real.st_size + 4096  # what it held when the hashing began

    monkeypatch.setattr(disk_module.os, "fstat", lambda fd: Larger(real_fstat(fd)))
    with pytest.raises(OSError, match="shrank"):
        sha256_of(path)


def test_a_stopped_commit_keeps_nothing_and_is_no_write_failure(store: BinaryStore) -> None:
    with store.open_fill(image_key("stopped")) as fill:
        fill.append([b"a" * 9000])
        fill.stop_commit()
        assert fill.commit(ZIP) is None
    assert fill.broken == "stopped while it was kept"
    assert files_in(store.directory) == []
    assert store.counters.write_failures == 0
    assert store.lookup(image_key("stopped").digest) is None
    stop = threading.Event()
    stop.set()
    path = store.directory / "any"
    path.write_bytes(b"x")
    with pytest.raises(disk_module.Stopped):
        sha256_of(path, stop=stop)


def _refuses_direct(real: Any) -> Any:
    """``real`` (os.pwrite or os.preadv), refusing a descriptor opened with O_DIRECT as some
    file systems do: the flag taken at open, the I/O refused (EINVAL)."""

    def call(fd: int, *args: Any) -> Any:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, *args)

    return call


def test_sha256_of_falls_back_where_direct_reads_are_refused_after_the_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 11)
    path = tmp_path / "kept"
    path.write_bytes(data)
    monkeypatch.setattr(disk_module.os, "preadv", _refuses_direct(os.preadv))
    assert sha256_of(path, direct=True) == hashlib.sha256(data).hexdigest()


def test_a_file_system_refusing_direct_io_after_the_open_still_keeps_files(
    store: BinaryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "pwrite", _refuses_direct(os.pwrite))
    monkeypatch.setattr(os, "preadv", _refuses_direct(os.preadv))
    data = [os.urandom(700_000) for _ in range(4)]
    with store.open_fill(image_key("refusing")) as fill:
        fill.append(data)
        kept = fill.commit(ZIP)
    assert kept is not None, fill.broken
    assert kept.sha256 == hashlib.sha256(b"".join(data)).hexdigest()
    assert kept.path.read_bytes() == b"".join(data)
    assert store.counters.write_failures == 0
