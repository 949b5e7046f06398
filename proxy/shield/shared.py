"""Limits, coalescing and the breaker shared by every worker and replica, kept in Redis.

Only with ``redis_url`` set; without it every limit is per process (the default, nothing extra
to run). Each primitive is one short Lua script (atomic in Redis, one round trip) and reads
Redis's clock, so replicas on machines whose clocks disagree still share one bucket:

* :class:`SharedLimits`: the upstream's concurrency cap (a sorted set of leased slots), its
  rate (a token bucket) and the ``Retry-After`` pause, in one script per upstream request;
* :class:`SharedAccounts`: per-user request rates and download slots, and login lockouts;
* :class:`Leases`: ``SET NX PX`` leases, renewed while their holder works, for one metadata
  fetch or one series fill per key across replicas (a dead holder blocks nobody for longer
  than the lease);
* :class:`BreakerSync`: one circuit state per upstream, opened by one replica, seen by all.

Redis unreachable or slow (past ``redis_timeout_seconds``) is never a reason to fail or hold a
request: :class:`SharedStore` raises :class:`StoreDown`, every caller then applies its
per-process limit, and the store is tried again a second later. The outage is logged once and
counted (``nbia_proxy_shared_store_errors_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    # Annotations only: both import modules that import this one. Redis's client is imported
    # by SharedStore only: a gateway without redis_url never loads it (about 6 MB of RSS).
    import redis.asyncio as aioredis

    from proxy.shield.breaker import Breaker
    from proxy.shield.counters import ShieldCounters

log = logging.getLogger("nbia_proxy.shield")

T = TypeVar("T")

#: After a failed call, how long every caller goes straight to its per-process fallback.
RETRY_AFTER_DOWN_SECONDS = 1.0
#: Polling while another process holds what this one waits for (a slot, a lease).
_POLL_FIRST = 0.005
_POLL_LONGEST = 0.05


class StoreDown(Exception):
    """The shared store did not answer in time: apply the per-process limit instead."""


# Redis's own clock in milliseconds: every replica reads the same one.
_NOW = "local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# A token bucket (the rule of proxy.shield.bucket.TokenBucket): returns 0 when a token was
# taken, else the milliseconds until one is there. Expects `now`, `bucket` and `rate`.
_BUCKET = """
local function take(bucket, rate, now)
  local burst = math.max(1, rate)
  local held = redis.call('HMGET', bucket, 'tokens', 'at')
  local tokens = tonumber(held[1]) or burst
  local at = tonumber(held[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - at) / 1000 * rate)
  local wait = 0
  if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) / rate * 1000) end
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('PEXPIRE', bucket, math.ceil(burst / rate * 1000) + 1000)
  return wait
end
"""

# KEYS: slots (zset token -> lease end), bucket, pause. ARGV: cap, lease ms, token, rate.
# {0}: a slot is held; {1}: all slots taken (poll); {2, ms}: paused or over the rate.
_ENTER = (
    _NOW
    + _BUCKET
    + """
local pause = tonumber(redis.call('GET', KEYS[3]) or '0')
if pause > now then return {2, pause - now} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return {1, 0} end
local rate = tonumber(ARGV[4])
if rate > 0 then
  local wait = take(KEYS[2], rate, now)
  if wait > 0 then return {2, wait} end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 4)
return {0, 0}
"""
)
# KEYS: slots. ARGV: lease ms, tokens...: the holders' leases start over.
_RENEW = (
    _NOW
    + """
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 4)
return 0
"""
)
# KEYS: a user's bucket. ARGV: rate. Returns the milliseconds to wait (0: admitted).
_ADMIT = _NOW + _BUCKET + "return take(KEYS[1], tonumber(ARGV[1]), now)\n"
# KEYS: pause. ARGV: ms. Every upstream request waits until then (the longest pause wins).
_PAUSE = (
    _NOW
    + """
local ends = now + tonumber(ARGV[1])
if ends > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], tostring(ends), 'PX', tonumber(ARGV[1]))
end
return 0
"""
)
# KEYS: failures, lockout. ARGV: free failures, longest lockout ms, forget-after ms.
# Returns {ms the address was still locked out before this failure, ms it is now, new (0/1)}.
_FAILED = """
local before = math.max(0, redis.call('PTTL', KEYS[2]))
local count = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
local beyond = count - tonumber(ARGV[1])
local longest = tonumber(ARGV[2])
if beyond > 0 and longest > 0 then
  local ms = math.min(longest, math.floor(2 ^ math.min(beyond - 1, 40) * 1000))
  redis.call('SET', KEYS[2], '1', 'PX', ms)
  return {before, ms, before == 0 and 1 or 0}
end
return {before, before, 0}
"""
# KEYS: a lease, its "done" marker. ARGV: its holder's token, ms, marker, marker ms. Renew (or
# let go, ms = 0, leaving the marker for the waiters) only if still held.
_LEASE_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
redis.call('DEL', KEYS[1])
if ARGV[3] ~= '' then redis.call('SET', KEYS[2], ARGV[3], 'PX', tonumber(ARGV[4])) end
return 1
"""


# KEYS: a lease, its "done" marker. ARGV: a token, ms. {1, marker} when taken, else {0, ""}.
_LEASE_TAKE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', tonumber(ARGV[2])) then return {0, ''} end
return {1, redis.call('GET', KEYS[2]) or ''}
"""


class SharedStore:
    """The Redis connection, every key under ``prefix``, and the fallback rule.

    A call that fails or takes longer than ``timeout`` raises :class:`StoreDown`, and for the
    next second every call does so at once (no request waits on a dead store twice).
    """

    def __init__(self, url: str, prefix: str, timeout: float, counters: ShieldCounters) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        self._failures = (RedisError, OSError, TimeoutError)
        self.prefix = prefix
        self.counters = counters
        self.timeout = timeout
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # a retry is the per-process fallback, not a wait
            health_check_interval=0,
        )
        self.errors = 0  # calls that failed or timed out
        self.down_since: float | None = None
        self._retry_at = 0.0
        self._scripts = {
            name: self.client.register_script(source)
            for name, source in (
                ("enter", _ENTER),
                ("renew", _RENEW),
                ("admit", _ADMIT),
                ("pause", _PAUSE),
                ("failed", _FAILED),
                ("lease", _LEASE_RENEW),
                ("take", _LEASE_TAKE),
            )
        }
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = False

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @property
    def up(self) -> bool:
        """Whether calls go to Redis now (False for a second after one failed, and for good
        once the store is closed)."""
        if self.closed:
            return False
        return self.down_since is None or time.monotonic() >= self._retry_at

    async def call(self, command: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """``command(client)`` within the time-out, or :class:`StoreDown`."""
        if not self.up:
            raise StoreDown
        try:
            async with asyncio.timeout(self.timeout * 2):
                result = await command(self.client)
        except self._failures as exc:
            self._failed(exc)
            raise StoreDown from None
        if self.down_since is not None:
            log.warning(
                "shared store answers again after %.1f s: limits are shared again",
                time.monotonic() - self.down_since,
            )
            self.down_since = None
        return result

    async def script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one of the scripts (:class:`StoreDown` when Redis does not answer in time)."""
        script = self._scripts[name]
        return await self.call(lambda _client: script(keys=list(keys), args=list(args)))

    def spawn(self, call: Coroutine[Any, Any, Any]) -> asyncio.Task[None] | None:
        """Run ``call`` in the background until :meth:`aclose`; a store that is down just
        misses it, a closed one does not run it (None)."""
        if self.closed:
            call.close()
            return None

        async def guarded() -> None:
            with contextlib.suppress(StoreDown):
                await call

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aclose(self) -> None:
        """Stop the background calls (lease renewals, releases) and close the connections.

        Bounded and quiet: with Redis gone or stopped dead, nothing here may hold up or fail
        the gateway's shutdown (what Redis holds for this process expires with its leases).
        """
        self.closed = True  # from now on every call is StoreDown at once: no new connection
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        try:
            async with asyncio.timeout(self.timeout * 4):
                await asyncio.gather(*tasks, return_exceptions=True)
                await self.client.aclose()
        except self._failures as exc:
            log.info("shared store connections closed uncleanly (%s)", type(exc).__name__)

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.counters.shared_store_errors += 1
        self._retry_at = time.monotonic() + RETRY_AFTER_DOWN_SECONDS
        if self.down_since is None:
            self.down_since = time.monotonic()
            # Once per outage: a dead store would otherwise log on every request.
            log.warning(
                "shared store unreachable (%s): limits, coalescing and the breaker are per "
                "process until it answers",
                type(exc).__name__,
            )


async def _poll(tries: int) -> None:
    """Sleep a little longer each try, with jitter so that waiters do not move in step."""
    pause = min(_POLL_LONGEST, _POLL_FIRST * (1.5**tries))
    await asyncio.sleep(pause * random.uniform(0.5, 1.0))


class _Renewer:
    """Keeps the leases of this process's held slots alive with one call per lease third."""

    def __init__(self, store: SharedStore, key: str, lease_ms: int) -> None:
        self.store = store
        self.key = key
        self.lease_ms = lease_ms
        self.held: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def hold(self, token: str) -> None:
        self.held.add(token)
        if self._task is None or self._task.done():
            # The store's own task: its aclose() ends the renewals with the connections.
            self._task = self.store.spawn(self._run())

    def drop(self, token: str) -> None:
        self.held.discard(token)

    async def _run(self) -> None:
        while self.held:
            await asyncio.sleep(self.lease_ms / 3000)
            if self.held:
                with contextlib.suppress(StoreDown):
                    await self.store.script("renew", [self.key], [self.lease_ms, *self.held])


class SharedLimits:
    """One upstream's cap, rate and pause for the whole deployment."""

    def __init__(self, store: SharedStore, upstream: str, cap: int, lease_seconds: float) -> None:
        self.store = store
        self.cap = cap
        self.lease_ms = max(1000, int(lease_seconds * 1000))
        self._slots = store.key("upstream", upstream, "slots")
        self._bucket = store.key("upstream", upstream, "bucket")
        self._pause = store.key("upstream", upstream, "pause")
        self._renewer = _Renewer(store, self._slots, self.lease_ms)

    async def enter(self, rate: float, deadline: float) -> str | None:
        """Wait for a slot (and the pause and rate) until ``deadline`` (monotonic): its token,
        or None when the store is down (then the caller applies its own limits).

        Raises :class:`TimeoutError` with the seconds that would still be needed when the
        deadline comes first (``args[0]``: "slots" or "pause").
        """
        token = uuid.uuid4().hex
        tries = 0
        while True:
            try:
                answer = await self.store.script(
                    "enter", [self._slots, self._bucket, self._pause],
                    [self.cap, self.lease_ms, token, rate],
                )  # fmt: skip
            except StoreDown:
                return None
            kind, ms = int(answer[0]), int(answer[1])
            if kind == 0:
                self._renewer.hold(token)
                return token
            now = time.monotonic()
            if kind == 2:
                wait = ms / 1000
                if now + wait > deadline:
                    raise TimeoutError("pause", wait)
                await asyncio.sleep(wait)
                continue
            if now >= deadline:
                raise TimeoutError("slots", 0.0)
            await _poll(tries)
            tries += 1

    def leave(self, token: str) -> None:
        """Give the slot back (in the background: the answer need not wait for it)."""
        self._renewer.drop(token)
        self.store.spawn(self.store.call(lambda client: client.zrem(self._slots, token)))

    def pause(self, seconds: float) -> None:
        """Hold every replica's upstream requests for ``seconds``."""
        self.store.spawn(self.store.script("pause", [self._pause], [max(1, int(seconds * 1000))]))


class SharedAccounts:
    """Per-user rates and download slots, and login lockouts, for the whole deployment."""

    def __init__(self, store: SharedStore, lease_seconds: float) -> None:
        self.store = store
        self.lease_ms = max(1000, int(lease_seconds * 1000))
        self._renewers: dict[str, _Renewer] = {}

    async def admit(self, user: str, rate: float) -> float:
        """Seconds until ``user`` may make a request (0: admitted now); :class:`StoreDown`."""
        ms = await self.store.script("admit", [self.store.key("user", user, "rate")], [rate])
        return int(ms) / 1000

    async def take_download(self, user: str, slots: int) -> Callable[[], None] | None:
        """Wait for one of ``user``'s ``slots`` download slots: what gives it back, or None
        when the store is down (the caller then applies its per-process slots instead)."""
        key = self.store.key("user", user, "downloads")
        token = uuid.uuid4().hex
        tries = 0
        while True:
            try:
                # The upstream script with neither pause nor rate: slots alone.
                answer = await self.store.script(
                    "enter", [key, key + ":-", key + ":-"], [slots, self.lease_ms, token, 0]
                )
            except StoreDown:
                return None
            if int(answer[0]) == 0:
                break
            await _poll(tries)
            tries += 1
        renewer = self._renewers.get(key)
        if renewer is None:
            renewer = self._renewers[key] = _Renewer(self.store, key, self.lease_ms)
        renewer.hold(token)

        def release() -> None:
            renewer.drop(token)
            if not renewer.held and self._renewers.get(key) is renewer:
                del self._renewers[key]
            self.store.spawn(self.store.call(lambda client: client.zrem(key, token)))

        return release

    async def locked_for(self, address: str) -> float:
        """Seconds left of ``address``'s lockout; :class:`StoreDown`."""
        key = self.store.key("lockout", address)
        ms = await self.store.call(lambda client: client.pttl(key))
        return max(0, int(ms)) / 1000

    async def failed(
        self, address: str, free: int, max_seconds: float, forget_seconds: float
    ) -> tuple[float, float, bool]:
        """Count wrong credentials from ``address``: (seconds it was still locked out, seconds
        it is now, whether this began a lockout); :class:`StoreDown`."""
        keys = [self.store.key("failures", address), self.store.key("lockout", address)]
        args = [free, int(max_seconds * 1000), int(forget_seconds * 1000)]
        before, now, new = await self.store.script("failed", keys, args)
        return int(before) / 1000, int(now) / 1000, bool(new)


class Leases:
    """Leases on names (``SET NX PX``): one holder across replicas, renewed while it works."""

    def __init__(self, store: SharedStore, kind: str, lease_seconds: float) -> None:
        self.store = store
        self.kind = kind
        self.lease_ms = max(500, int(lease_seconds * 1000))

    def key(self, name: str) -> str:
        return self.store.key(self.kind, name)

    async def take(self, name: str) -> tuple[str | None, str]:
        """The lease's token if this process holds it now (None if another does), and the
        marker its last holder left (:meth:`keep`); :class:`StoreDown`."""
        token = uuid.uuid4().hex
        key = self.key(name)
        keys = [key, key + ":done"]
        taken, marker = await self.store.script("take", keys, [token, self.lease_ms])
        text = marker.decode() if isinstance(marker, bytes) else str(marker)
        return (token if int(taken) else None), text

    async def held(self, name: str) -> bool:
        """Whether anyone holds the lease on ``name``; :class:`StoreDown`."""
        key = self.key(name)
        return bool(await self.store.call(lambda c: c.exists(key)))

    async def wait_free(self, name: str) -> None:
        """Until nobody holds ``name`` (a dead holder's lease runs out); StoreDown."""
        tries = 0
        while await self.held(name):
            await _poll(tries + 6)  # a fetch takes a while: no need to ask every millisecond
            tries += 1

    async def keep(
        self,
        name: str,
        token: str,
        work: Awaitable[T],
        marker: Callable[[], str] = lambda: "",
    ) -> T:
        """Await ``work`` while renewing the lease, then let it go (whatever the outcome),
        leaving ``marker()`` for a lease time as what the waiters find (:meth:`outcome`)."""
        key = self.key(name)

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.lease_ms / 3000)
                with contextlib.suppress(StoreDown):
                    await self.store.script("lease", [key, key + ":done"], [token, self.lease_ms])

        renewing = asyncio.get_running_loop().create_task(renew())
        try:
            return await work
        finally:
            renewing.cancel()
            keys = [key, key + ":done"]
            args = [token, 0, marker(), self.lease_ms]
            self.store.spawn(self.store.script("lease", keys, args))

    def let_go(self, name: str, token: str) -> None:
        """Give up the lease without having done the work (the marker stays as it was)."""
        key = self.key(name)
        self.store.spawn(self.store.script("lease", [key, key + ":done"], [token, 0, "", 0]))

    async def outcome(self, name: str) -> str:
        """The marker the last holder of ``name`` left ("" if none); :class:`StoreDown`."""
        key = self.key(name) + ":done"
        value = await self.store.call(lambda c: c.get(key))
        return value.decode() if isinstance(value, bytes) else ""


class SharedFlights:
    """One metadata fetch per key across replicas: the lease holder fetches and stores; the
    others wait for the lease to go, then read the stored answer (they share the database)."""

    def __init__(self, leases: Leases) -> None:
        self.leases = leases
        self.joined = 0  # flights answered from another process's fetch

    async def once(
        self,
        key: str,
        fetch: Callable[[], Awaitable[T]],
        recall: Callable[[], Awaitable[T | None]],
        stored: Callable[[], bool],
    ) -> T:
        """``fetch()`` unless another process is fetching ``key``: then the answer it stored
        (``recall()``), or a fetch of this process's own when it stored none (an error answer,
        a holder that died). ``stored()`` says whether this process's fetch stored its answer:
        the holder does not wait for the database, the waiters do, for a lease time at most."""
        while True:
            try:
                token, outcome = await self.leases.take(key)
                if token is None:
                    await self.leases.wait_free(key)
                    outcome = await self.leases.outcome(key)
            except StoreDown:
                return await fetch()
            if outcome == "stored":
                # Fetched and stored just now by another process (which may still be writing
                # it): its answer, not a second upstream request.
                answer = await self._recall(recall)
                if answer is not None:
                    if token is not None:
                        self.leases.let_go(key, token)
                    self.joined += 1
                    return answer
            if token is None:
                continue  # nothing stored: try to be the one who fetches
            return await self.leases.keep(
                key, token, fetch(), lambda: "stored" if stored() else "none"
            )

    async def _recall(self, recall: Callable[[], Awaitable[T | None]]) -> T | None:
        """The stored answer once the holder's write is in the database (the writer commits
        within milliseconds; a lease time at most)."""
        deadline = time.monotonic() + self.leases.lease_ms / 1000
        tries = 0
        while True:
            answer = await recall()
            if answer is not None or time.monotonic() >= deadline:
                return answer
            await _poll(tries + 3)
            tries += 1


class SharedFills:
    """One series fill per key across replicas: a process fills only while it holds the key's
    lease; the others wait for the lease to go and then serve the kept file (or fill it
    themselves when none was kept: the holder failed or died)."""

    def __init__(self, leases: Leases) -> None:
        self.leases = leases
        self.waited = 0  # requests that waited for another process's fill

    async def claim(self, key: str, settled: Callable[[], Awaitable[bool]]) -> str | None:
        """The lease's token ("" when the store is down: fill without one), or None when
        ``settled()`` says the key was filled (or is filling here) meanwhile: answer afresh."""
        first = True
        while True:
            if not first and await settled():
                return None
            first = False
            try:
                token, _ = await self.leases.take(key)
                if token is not None:
                    return token
                self.waited += 1
                await self.leases.wait_free(key)
            except StoreDown:
                return ""

    def hold(self, key: str, token: str, fill: asyncio.Future[Any]) -> None:
        """Keep the lease until ``fill`` ends (kept, failed or cancelled)."""
        if not token:
            return

        async def until_done() -> None:
            await asyncio.wait([fill])

        self.leases.store.spawn(self.leases.keep(key, token, until_done()))


class BreakerSync:
    """One circuit per upstream: a replica's breaker that opens or closes says so in Redis,
    and every replica adopts what it reads there (polled every ``interval`` seconds)."""

    #: An open circuit nobody closes (every replica gone) is forgotten after this long.
    OPEN_FOR_MS = 600_000

    def __init__(self, store: SharedStore, upstream: str, interval: float = 0.25) -> None:
        self.store = store
        self.key = store.key("breaker", upstream)
        self.interval = interval
        self.published_open = False  # this process's open circuit is in Redis
        self.adopted = False  # the local circuit is open because another replica's is
        self._task: asyncio.Task[None] | None = None

    def changed(self, opened: bool) -> None:
        """The local breaker opened or closed on its own evidence: tell the others."""
        self.adopted = False
        self.published_open = False

        async def publish() -> None:
            if opened:
                await self.store.call(lambda c: c.set(self.key, "1", px=self.OPEN_FOR_MS))
                self.published_open = True
            else:
                await self.store.call(lambda c: c.delete(self.key))

        with contextlib.suppress(RuntimeError):  # no event loop: a breaker driven by hand
            self.store.spawn(publish())

    async def read(self) -> bool | None:
        """Whether the shared circuit is open (None: the store is down, nobody knows)."""
        try:
            return bool(await self.store.call(lambda c: c.exists(self.key)))
        except StoreDown:
            return None

    def follow(self, breaker: Breaker) -> None:
        """Publish ``breaker``'s own changes and adopt the others' (polling, until
        :meth:`aclose`; call it on the event loop)."""
        breaker.on_change = self.changed

        def step(shared_open: bool) -> None:
            if shared_open and not breaker.is_open:
                breaker.adopt(True)
                self.adopted = True
            elif not shared_open and breaker.is_open and (self.adopted or self.published_open):
                # Closed by the replica that saw the upstream back (an open circuit of this
                # process's own that is not published yet is left alone).
                breaker.adopt(False)
                self.adopted = self.published_open = False

        async def run() -> None:
            while True:
                await asyncio.sleep(self.interval)
                shared = await self.read()
                if shared is not None:
                    step(shared)

        self._task = asyncio.get_running_loop().create_task(run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
