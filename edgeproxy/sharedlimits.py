"""Per-client connection limits shared by every worker of every node through Redis (design.md §4
"Scaling", §8), falling back to the worker's own :class:`~edgeproxy.limits.ConnectionLimiter` while
Redis is unwell.

Who decides what:

- **The total** (``max_total``) is this process's own capacity, so ``local`` always decides it,
  before Redis is asked: a full worker costs Redis nothing.
- **Per client** (``max_per_ip`` connections held, ``rate_per_minute`` admissions in a sliding
  60-second window) Redis decides while it is healthy, in one round trip: a Lua script prunes,
  counts, and admits or refuses atomically, so no two workers can both take the last slot. A
  refused admission is counted nowhere (in Redis or locally).
- **Locally, every connection this worker holds is counted**, whatever Redis said, so a fallback
  starts from this worker's truth. With the existing ``ConnectionLimiter`` API this works in this
  order: Redis first; only when Redis admits, ``local.admit``. The local per-client count and rate
  cover a subset of the connections Redis sees, so they are lower bounds of the true figures: when
  the local limiter refuses although Redis admitted (Redis lost its data in a restart, or this
  worker still holds connections it admitted on its own during an outage), the client really is
  over the limit, the refusal stands and the Redis entry is removed again. The other order (local
  first, Redis second) cannot be undone: ``release`` gives back the count but not the local rate
  entry, so every Redis refusal would leave a phantom admission behind and lock a retrying client
  out of this worker for good.
- **Redis unwell** (a call exceeding ``timeout``, a connection error, any Redis error): that decision
  and every one after it is ``local.admit`` alone, the same answer a worker without Redis would give
  (so never a refusal the local limits would not make), one ``redis_down`` warning per outage, and
  no Redis call until ``retry_interval`` has passed. Then the next decision is the trial (one at a
  time; the others stay local without waiting); when it succeeds, one ``redis_up`` info line with
  the number of local decisions taken meanwhile. Mail is never refused, nor delayed by more than
  ``timeout``, because Redis is unwell.
- **Release** removes the connection from Redis only when Redis admitted it, exactly once, without
  blocking (a task). Removals due while Redis is unwell wait for its return, as do the removals of
  admissions whose call failed (a call that timed out may still run in Redis later).

In Redis, per client (keys hash-tagged by client, so a script's two keys share a Cluster slot):

- ``<prefix>conn:{client}``: a sorted set of ``holder/connection_id`` scored by the time the
  connection's hold expires (admission + ``hold_seconds``, the session time limit), pruned by the
  script, so a crashed node's connections stop counting after ``hold_seconds``;
- ``<prefix>rate:{client}``: a sorted set of the same members scored by admission time, pruned to
  the last 60 s;

each with a PEXPIRE covering its newest member, so an idle client leaves nothing behind. Scores come
from Redis's own clock (``TIME``; Redis >= 5 for effect replication): the ``now`` passed to
:meth:`SharedLimiter.admit` is this host's monotonic clock, meaningless on another node, and feeds
the local limiter only. ``holder`` names this worker (node and process) so that connection ids,
unique only per process, do not collide between workers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from edgeproxy.limits import _RATE_WINDOW, ConnectionLimiter

log = structlog.get_logger("edgeproxy")

TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS"
RATE_LIMITED = "RATE_LIMITED"

# KEYS: conn, rate. ARGV: member, max connections, max admissions per window, hold ms, window ms,
# then members of this worker whose connections ended since its last round trip (their releases
# ride along, so the count is exact for this worker's own clients).
# Returns 0 (admitted, counted in both sets), 1 (too many connections), 2 (rate limited). A member
# already present was admitted by an earlier attempt of the same call (see _RETRY): admitted again.
_ADMIT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_conn, max_rate = tonumber(ARGV[2]), tonumber(ARGV[3])
local hold, window = tonumber(ARGV[4]), tonumber(ARGV[5])
for i = 6, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return 0
end
if max_conn > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= max_conn then return 1 end
end
if max_rate > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  if redis.call('ZCARD', KEYS[2]) >= max_rate then return 2 end
end
if max_conn > 0 then
  redis.call('ZADD', KEYS[1], now + hold, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], hold)
end
if max_rate > 0 then
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[2], window)
end
return 0
"""
_VERDICTS: dict[int, str | None] = {0: None, 1: TOO_MANY_CONNECTIONS, 2: RATE_LIMITED}
# One immediate retry on a connection error, within the same timeout: a pooled connection found dead
# (Redis restarted, a proxy dropped an idle one) is then no outage. Not on a timeout: that is the
# budget spent. The script is idempotent for a connection id, so a retry cannot count twice.
_RETRY = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
# Redis being unwell, as the client library reports it; anything else is a bug and propagates.
_TROUBLE = (TimeoutError, RedisError, OSError)
# Removals waiting for Redis to return: past this many, further ones are left to expire by themselves
# rather than let a long outage grow the list without bound.
_MAX_DEFERRED = 100_000
_REMOVAL_BATCH = 500
# Releases wait this long to go to Redis together, in one pipeline: a round trip per release cost
# as much CPU as the session it ended (a relay refusal); a slot freed 50 ms late costs nobody.
_RELEASE_DELAY = 0.05


class _UnexpectedReply(RedisError):
    pass


class SharedLimiter:
    """One worker's view of the shared per-client limits; see the module docstring."""

    def __init__(self, local: ConnectionLimiter, url: str, timeout: float, *, holder: str,
                 hold_seconds: float, retry_interval: float = 1.0, key_prefix: str = "edgeproxy:") -> None:
        self.local = local
        self.healthy = True
        self.fallbacks = 0
        self.outages = 0
        self._timeout = timeout
        self._holder = holder
        self._hold_ms = max(1, round(hold_seconds * 1000))
        self._window_ms = round(_RATE_WINDOW * 1000)
        self._retry_interval = retry_interval
        self._prefix = key_prefix
        # Nothing per client to share: Redis is never asked.
        self._shared = bool(local.max_per_ip or local.rate_per_minute)
        # No retries in the library beyond _RETRY: an unwell Redis is our business (fall back,
        # retry later), and every decision must be over within our own timeout.
        self._redis = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=_RETRY)
        self._sha = self._redis.register_script(_ADMIT_SCRIPT).sha
        # connection_id -> whether Redis holds it (admitted through Redis with a per-client limit).
        self._held: dict[str, bool] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # (client, member, whether the rate entry goes too): removals waiting for Redis's return.
        self._deferred: list[tuple[str, str, bool]] = []
        self._releases: dict[str, list[str]] = {}  # client -> members released, for the next trip
        self._release_timer: asyncio.TimerHandle | None = None
        self._retry_at = 0.0
        self._trying = False
        self._down_since = 0.0
        self._fallbacks_before = 0
        self._closed = False
        self._auth_failure_serial = 0

    async def admit(self, client: str, connection_id: str, now: float) -> str | None:
        """Count the connection in and return None, or the name of the limit it hits. ``now`` is the
        local limiter's clock (monotonic); ``connection_id`` must be unique within this worker."""
        local = self.local
        if local.total >= local.max_total:
            return TOO_MANY_CONNECTIONS
        if not self._shared or self._closed:
            return self._admit_locally(client, connection_id, now)
        trial = not self.healthy
        if trial:
            if self._trying or time.monotonic() < self._retry_at:
                return self._fall_back(client, connection_id, now)
            self._trying = True
        member = self._member(connection_id)
        released = self._releases.pop(client, [])
        try:
            verdict = await self._ask(client, member, released)
        except _TROUBLE as error:
            # The call may still run in Redis (a timed-out one, once Redis wakes up): remove it then.
            self._defer(client, member, admission=True)
            for gone in released:
                self._defer(client, gone, admission=False)
            self._went_wrong(error, trial)
            return self._fall_back(client, connection_id, now)
        except asyncio.CancelledError:
            self._forget(client, member, admission=True)
            for gone in released:
                self._forget(client, gone, admission=False)
            raise
        finally:
            if trial:
                self._trying = False
        if trial:
            self._came_back()
        if verdict is not None:
            return verdict
        refusal = local.admit(client, now)
        if refusal is not None:
            # Full meanwhile, or a local lower bound already over the limit: the refusal stands.
            self._forget(client, member, admission=True)
            return refusal
        self._held[connection_id] = bool(local.max_per_ip)
        return None

    # -- AUTH failures ------------------------------------------------------------------------

    async def auth_failures(self, client: str, window: float) -> int | None:
        """The client's AUTH failures within ``window`` seconds on every node, or None when Redis
        cannot say now (the caller counts alone then). One round trip, within the timeout; an
        outage is the admissions' to notice and log."""
        if not self.healthy or self._closed:
            return None
        key = self._key("authfail", client)
        now_ms = round(time.time() * 1000)
        try:
            async with asyncio.timeout(self._timeout):
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.zremrangebyscore(key, "-inf", now_ms - round(window * 1000))
                    pipe.zcard(key)
                    _, count = await pipe.execute()
        except _TROUBLE:
            return None
        return int(count)

    def auth_failed(self, client: str, window: float) -> None:
        """Count one AUTH failure for every node to see (soon, never waiting); the key expires
        with the window. Lost while Redis is unwell: each node still counts its own."""
        if not self.healthy or self._closed:
            return
        self._auth_failure_serial += 1
        member = f"{self._holder}/{self._auth_failure_serial}"
        self._spawn(self._add_auth_failure(self._key("authfail", client), member, round(window * 1000)))

    async def _add_auth_failure(self, key: str, member: str, window_ms: int) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.zadd(key, {member: round(time.time() * 1000)})
                    pipe.pexpire(key, window_ms)
                    await pipe.execute()
        except _TROUBLE:
            pass

    def release(self, client: str, connection_id: str) -> None:
        """Count the connection out, here at once and in Redis soon (if Redis admitted it). A second
        release, or one for a connection never admitted, does nothing."""
        in_redis = self._held.pop(connection_id, None)
        if in_redis is None:
            return
        self.local.release(client)
        if in_redis:
            self._forget(client, self._member(connection_id), admission=False)

    async def settle(self) -> None:
        """Send the gathered releases now and wait for every removal scheduled (each bounded by
        the timeout)."""
        self._send_releases()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Finish the scheduled removals, then close the Redis connections; decisions after this
        are local (and not counted as fallbacks)."""
        self._closed = True
        await self.settle()
        await self._redis.aclose()

    # -- decisions ------------------------------------------------------------------------------

    def _admit_locally(self, client: str, connection_id: str, now: float) -> str | None:
        refusal = self.local.admit(client, now)
        if refusal is None:
            self._held[connection_id] = False
        return refusal

    def _fall_back(self, client: str, connection_id: str, now: float) -> str | None:
        self.fallbacks += 1
        return self._admit_locally(client, connection_id, now)

    async def _ask(self, client: str, member: str, released: list[str]) -> str | None:
        local = self.local
        keys_and_args = (self._key("conn", client), self._key("rate", client), member, local.max_per_ip,
                         local.rate_per_minute, self._hold_ms, self._window_ms, *released)
        async with asyncio.timeout(self._timeout):
            try:
                code = await self._redis.evalsha(self._sha, 2, *keys_and_args)
            except NoScriptError:
                # A restarted or flushed Redis: EVAL answers and caches the script again, in one trip.
                code = await self._redis.eval(_ADMIT_SCRIPT, 2, *keys_and_args)
        if code not in _VERDICTS:
            raise _UnexpectedReply(f"admit script returned {code!r}")
        return _VERDICTS[code]

    # -- health ---------------------------------------------------------------------------------

    def _went_wrong(self, error: BaseException, trial: bool) -> None:
        if self.healthy:
            self.healthy = False
            self.outages += 1
            self._down_since = time.monotonic()
            self._fallbacks_before = self.fallbacks
            log.warning("redis_down", reason=_reason(error, self._timeout))
            self._retry_at = time.monotonic() + self._retry_interval
        elif trial:
            self._retry_at = time.monotonic() + self._retry_interval
        # (A call begun while healthy and failing after the outage began changes nothing: the
        # outage is already known, and its retry already timed.)

    def _came_back(self) -> None:
        self.healthy = True
        log.info("redis_up", local_decisions=self.fallbacks - self._fallbacks_before,
                 seconds=round(time.monotonic() - self._down_since, 3))
        deferred, self._deferred = self._deferred, []
        self._remove_in_batches(deferred)

    # -- removals -------------------------------------------------------------------------------

    def _forget(self, client: str, member: str, *, admission: bool) -> None:
        """Remove a member from Redis: its hold (a release), and its rate entry too when the
        admission itself is undone. Never waits."""
        if self._closed:
            return  # left to expire after hold_seconds, as a crashed worker's would
        if not self.healthy:
            self._defer(client, member, admission=admission)
            return
        if admission:
            self._spawn(self._remove([(client, member, True)]))  # (an undone admission: rare)
            return
        self._releases.setdefault(client, []).append(member)
        if self._release_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (shutting down): the entry expires by itself
            self._release_timer = loop.call_later(_RELEASE_DELAY, self._send_releases)

    def _send_releases(self) -> None:
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        releases = [(client, member, False) for client, members in self._releases.items() for member in members]
        self._releases = {}
        self._remove_in_batches(releases)

    def _remove_in_batches(self, removals: list[tuple[str, str, bool]]) -> None:
        for start in range(0, len(removals), _REMOVAL_BATCH):
            self._spawn(self._remove(removals[start:start + _REMOVAL_BATCH]))

    def _defer(self, client: str, member: str, *, admission: bool) -> None:
        if len(self._deferred) < _MAX_DEFERRED:
            self._deferred.append((client, member, admission))

    async def _remove(self, removals: list[tuple[str, str, bool]]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                if len(removals) == 1 and not removals[0][2]:
                    client, member, _ = removals[0]
                    await self._redis.zrem(self._key("conn", client), member)
                    return
                async with self._redis.pipeline(transaction=False) as pipe:
                    for client, member, admission in removals:
                        pipe.zrem(self._key("conn", client), member)
                        if admission:
                            pipe.zrem(self._key("rate", client), member)
                    await pipe.execute()
        except _TROUBLE:
            # Not worth an outage of its own: the next decision finds out whether Redis is unwell,
            # and an entry left behind expires after hold_seconds (60 s for a rate entry).
            pass

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coroutine)
        except RuntimeError:
            coroutine.close()  # no loop (shutting down): the entry expires by itself
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _member(self, connection_id: str) -> str:
        return f"{self._holder}/{connection_id}"

    def _key(self, kind: str, client: str) -> str:
        return f"{self._prefix}{kind}:{{{client}}}"


def _reason(error: BaseException, timeout: float) -> str:
    if isinstance(error, TimeoutError):
        return f"no answer within {timeout:g} s"
    text = str(error) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
