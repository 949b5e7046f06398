"""A fill's temporary file is closed only once no thread uses its descriptor.

The fill's writer thread (a batch's write) and its commit thread (``fsync``) use the
descriptor of :class:`proxy.binary.files.Fill`; when the fill is stopped, ``Fill.discard`` closes
it from another worker thread. ``Fills._fill`` waits for the writer and the commit by awaiting the
asyncio tasks that wrap their threads, but a cancelled ``asyncio.to_thread`` task is done at once
while its thread runs on. Two ways that happens:

* the gateway stops: ``asyncio.Runner.close`` cancels every task at once, the fill, its writer's
  task and its commit's task among them (the log then says ``Bad file descriptor``);
* the fill task is cancelled a second time during its teardown (its last reader left, a new
  reader joined the fill being torn down and left as well): ``_Writer.stop`` swallows that
  cancellation and returns before the thread's batch ended.

Either way the descriptor is closed under the thread; a file opened meanwhile gets its number and
the thread's bytes. :class:`~proxy.binary.files.Fill` owns its descriptor under a lock, so the
discard waits for the write. The writer thread is held inside its write here (after the fill's
checks, before the system call) while a fresh file is opened, then let go.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.binary import files as files_module
from proxy.binary.appender import Appender
from proxy.binary.files import BinaryStore
from proxy.binary.fill import BATCH_BYTES, Filling, FillJob, Fills, _outlast
from proxy.binary.verdict import Verdict
from proxy.cache.policy import CacheKey
from proxy.db import make_engine, migrate

#: How long the teardown is given to close the descriptor (it takes a few milliseconds). A
#: correct fill waits for its writer thread and stays unfinished for all of it; a slow machine
#: can only make the test miss the fault, never fail a correct fill.
GRACE_SECONDS = 1.0


class _Check:
    failure: Verdict | None = None

    def feed(self, chunk: bytes) -> None:
        pass

    def finish(self) -> Verdict:  # never reached: the upstream stalls
        raise AssertionError("the download never ends here")


class _Answer:
    """An upstream answer whose body gives one batch, then stalls (the fill is in progress)."""

    headers = httpx.Headers({"content-type": "application/zip", "content-length": str(1 << 30)})

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        yield b"z" * BATCH_BYTES
        await asyncio.Event().wait()


def _start_fill(
    store: BinaryStore, check: type[_Check], answer: Any
) -> tuple[Filling, asyncio.Future[None]]:
    """A fill of :func:`_key` reading ``answer``, as its own task (call on the event loop)."""
    fills = Fills(store, None, background=False, max_error_bytes=1024)  # type: ignore[arg-type]
    job = FillJob(None, None, None, _key(), check)  # type: ignore[arg-type]
    filling = Filling(job.key)
    return filling, asyncio.ensure_future(fills._fill(filling, job, answer))


def _key() -> CacheKey:
    params = "?SeriesInstanceUID=1.2.3"
    digest = hashlib.sha256(params.encode()).hexdigest()
    return CacheKey(digest, "nbia", "anonymous", "GET", "v4/getImage", params, frozenset())


@pytest.mark.parametrize("stop", ["shutdown", "cancelled_twice"])
def test_a_stopped_fill_never_closes_the_descriptor_its_writer_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    migrate(url)
    engine = make_engine(url)
    store = BinaryStore(engine, tmp_path / "binaries", 1 << 40)
    store.start()
    entered, gate = threading.Event(), threading.Event()
    real_append = Appender.append
    in_use: list[int] = []

    threads: list[str] = []

    def held_append(self: Appender, chunks: list[bytes]) -> None:
        in_use.append(self.fd)
        threads.append(threading.current_thread().name)
        entered.set()
        gate.wait()
        real_append(self, chunks)

    monkeypatch.setattr(Appender, "append", held_append)
    other = tmp_path / "another-file"

    async def main() -> None:
        _, task = _start_fill(store, _Check, _Answer())
        # The writer thread is inside its write (bounded: a file system the store cannot use,
        # whose free space reads 0, opens no fill at all).
        await asyncio.to_thread(entered.wait, 60)
        assert entered.is_set(), "the fill never reached its write"
        if stop == "shutdown":
            # What asyncio.run does on the way out (after the lifespan's shutdown).
            for each in asyncio.all_tasks() - {asyncio.current_task()}:
                each.cancel()
        else:
            task.cancel()
            for _ in range(3):
                await asyncio.sleep(0)  # the teardown is in _Writer.stop now
            task.cancel()  # a reader that joined the dying fill left too
        await asyncio.wait([task], timeout=GRACE_SECONDS)
        # Another file opened while the writer thread is still inside its write: it gets the
        # number the writer holds when the teardown closed it (as the next fill's, a hit's or
        # a socket's descriptor would).
        fd = os.open(other, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            try:
                os.fstat(in_use[0])
            except OSError:
                os.dup2(fd, in_use[0])  # closed under the writer: the number is free
                os.close(fd)
                fd = in_use[0]
            gate.set()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    try:
        asyncio.run(main())
    finally:
        gate.set()
        engine.dispose()
    # The fill writers' own pool, not the default executor that hits and commits need.
    assert threads and all(name.startswith("nbia-proxy-fill") for name in threads)
    assert other.stat().st_size == 0, "the writer thread wrote the download into another file"
    assert store.counters.write_failures == 0, store.counters.last_failure
    with pytest.raises(OSError):
        os.fstat(in_use[0])  # closed once the writer was done with it
    assert not [p for p in (tmp_path / "binaries").rglob("*") if ".part-" in p.name]


def test_a_teardown_cancelled_again_still_waits_for_the_thread_before_cleaning_up() -> None:
    """A second cancellation while the teardown waits for the commit's (or the opening's)
    thread must not skip the clean-up after it: the descriptor, the .part file and the busy
    entry would leak."""

    async def main() -> list[bool]:
        release = threading.Event()
        thread = asyncio.ensure_future(asyncio.to_thread(release.wait))
        cleaned: list[bool] = []

        async def teardown() -> None:
            try:
                await _outlast(thread)
            finally:
                cleaned.append(thread.done())

        task = asyncio.ensure_future(teardown())
        for _ in range(2):
            await asyncio.sleep(0)
            task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # still waiting for the thread
        release.set()
        await asyncio.wait([task])
        return cleaned

    assert asyncio.run(main()) == [True]


class _GoodCheck(_Check):
    def finish(self) -> Verdict:
        return Verdict(ok=True, reason=None, message="", level="self")


class _WholeAnswer:
    """An upstream answer that ends after three batches."""

    headers = httpx.Headers({"content-type": "application/zip"})

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"z" * BATCH_BYTES


def test_a_stop_during_the_commit_ends_its_sha256_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checked fill is cancelled only by the gateway's stop; its commit, reading a
    multi-GB file back for the sha256, must then give up at the next MiB rather than hold the
    stop up: nothing kept, nothing left, not counted as a write failure."""
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    migrate(url)
    engine = make_engine(url)
    store = BinaryStore(engine, tmp_path / "binaries", 1 << 40)
    store.start()
    reading, told = threading.Event(), []
    real_sha256_of = files_module.sha256_of

    def slow_read_back(path: Path, *, direct: bool, stop: threading.Event) -> str | None:
        reading.set()
        told.append(stop.wait(60))  # a multi-GB file: still reading when the stop comes
        return real_sha256_of(path, direct=direct, stop=stop)

    monkeypatch.setattr(files_module, "sha256_of", slow_read_back)

    async def main() -> Filling:
        filling, task = _start_fill(store, _GoodCheck, _WholeAnswer())
        await asyncio.to_thread(reading.wait, 60)
        assert reading.is_set(), "the fill never reached its commit"
        assert filling.checked  # every byte released: only a stop cancels it now
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return filling

    try:
        filling = asyncio.run(main())
    finally:
        engine.dispose()
    assert told == [True], "the commit was not told to stop"
    assert filling.kept is None
    assert not [p for p in (tmp_path / "binaries").rglob("*") if p.is_file() and p.name[0] != "."]
    assert store.counters.write_failures == 0, store.counters.last_failure
